#include "engine.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <stdexcept>

#include "async_queue.h"

namespace fuyou {

namespace {
int64_t monotonic_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}
}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Request

Request::~Request() { close_files(); }

void Request::close_files() {
  for (FileHandle& f : files_) {
    if (f.direct_fd >= 0) ::close(f.direct_fd);
    if (f.buffered_fd >= 0) ::close(f.buffered_fd);
    f.direct_fd = f.buffered_fd = -1;
  }
}

bool Request::wait(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  if (timeout_s < 0) {
    cv_.wait(lock, [this] { return finished_; });
    return true;
  }
  return cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [this] { return finished_; });
}

bool Request::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return finished_;
}

std::optional<IOError> Request::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void Request::fail(IOError err) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!error_) error_ = std::move(err);
  failed_.store(true, std::memory_order_relaxed);
}

void Request::block_finished() {
  if (pending_.fetch_sub(1) != 1) return;
  // Last piece: nothing uses the descriptors any more, so close them now rather than when the handle is dropped.
  close_files();
  keep_alive_.reset();  // e.g. hands a pinned buffer back to its pool as soon as the transfer is over
  finished_ns_.store(monotonic_ns());
  {
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = true;
  }
  cv_.notify_all();
}

// ---------------------------------------------------------------------------------------------------------------
// Worker

class Worker {
 public:
  Worker(Engine& engine, std::unique_ptr<AsyncQueue> queue)
      : engine_(engine), queue_(std::move(queue)), slots_(engine.options().queue_depth) {
    for (int i = static_cast<int>(slots_.size()) - 1; i >= 0; --i) free_slots_.push_back(i);
    thread_ = std::thread([this] { queue_ ? run_async() : run_sync_only(); });
  }
  ~Worker() {
    thread_.join();
    for (char* b : bounce_) std::free(b);
  }
  int64_t bounce_bytes() const { return bounce_count_.load() * engine_.options().block_size; }

 private:
  struct Slot {
    std::optional<Block> block;
    char* bounce = nullptr;
  };

  void run_sync_only() {
    while (std::optional<Block> b = engine_.pop(true)) {
      if (b->req->failed()) {
        b->req->block_finished();
        continue;
      }
      run_sync(*b);
    }
  }

  void run_async() {
    std::deque<Block> pending;
    std::vector<Completion> completions;
    std::vector<int> rejected;
    while (true) {
      if (inflight_ == 0 && pending.empty()) {
        std::optional<Block> b = engine_.pop(true);
        if (!b) return;  // shutting down and nothing left anywhere
        pending.push_back(std::move(*b));
      }
      while (inflight_ + static_cast<int>(pending.size()) < static_cast<int>(slots_.size())) {
        std::optional<Block> b = engine_.pop(false);
        if (!b) break;
        pending.push_back(std::move(*b));
      }

      bool staged = false;
      while (!pending.empty() && !free_slots_.empty()) {
        Block& b = pending.front();
        if (b.req->failed()) {  // an earlier piece failed: skip the rest of the request
          b.req->block_finished();
          pending.pop_front();
          continue;
        }
        if (!b.direct) {
          run_sync(b);
          pending.pop_front();
          continue;
        }
        char* target = b.buf;
        char* bounce = nullptr;
        if (!is_aligned(reinterpret_cast<intptr_t>(b.buf))) {
          bounce = take_bounce();
          if (!bounce) break;  // every bounce block is in flight: a completion will free one
          if (b.req->op_ == Op::kWrite) std::memcpy(bounce, b.buf, b.len);
          target = bounce;
        }
        int slot = free_slots_.back();
        free_slots_.pop_back();
        const FileHandle& f = b.req->files_[b.file];
        queue_->prepare(slot, b.req->op_, f.direct_fd, target, b.len, b.offset);
        slots_[slot].block = std::move(b);
        slots_[slot].bounce = bounce;
        pending.pop_front();
        ++inflight_;
        staged = true;
      }
      if (staged) {
        rejected.clear();
        int err = queue_->submit(rejected);
        for (int slot : rejected) complete(slot, err);
      }
      if (inflight_ > 0) {
        completions.clear();
        queue_->wait(1, completions);
        for (const Completion& c : completions) complete(c.slot, c.result);
      }
    }
  }

  char* take_bounce() {
    if (!free_bounce_.empty()) {
      char* b = free_bounce_.back();
      free_bounce_.pop_back();
      return b;
    }
    if (bounce_.size() >= kBounceBlocksPerWorker) return nullptr;
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, engine_.options().block_size) != 0) return nullptr;
    bounce_.push_back(static_cast<char*>(p));
    bounce_count_.fetch_add(1);
    return static_cast<char*>(p);
  }

  void complete(int slot, int64_t result) {
    Slot& s = slots_[slot];
    Block b = std::move(*s.block);
    s.block.reset();
    if (s.bounce) {
      if (b.req->op_ == Op::kRead && result > 0) std::memcpy(b.buf, s.bounce, std::min(result, b.len));
      free_bounce_.push_back(s.bounce);
      s.bounce = nullptr;
    }
    free_slots_.push_back(slot);
    --inflight_;
    finish(b, result);
  }

  void run_sync(Block& b) {
    int fd = b.req->files_[b.file].buffered_fd;
    int64_t result =
        b.req->op_ == Op::kRead ? full_pread(fd, b.buf, b.len, b.offset) : full_pwrite(fd, b.buf, b.len, b.offset);
    finish(b, result);
  }

  // Checks that the whole block moved. An O_DIRECT block that the kernel cut short (a write at a size limit or on
  // a full disk) or refused as misaligned (EINVAL: the kernel shortened it to an unaligned length first) is
  // finished through a buffered descriptor, which either completes it or reports the real cause (ENOSPC, EFBIG)
  // instead of a bare count or a misleading EINVAL.
  void finish(Block& b, int64_t result) {
    Request& r = *b.req;
    const std::string& path = r.files_[b.file].path;
    bool cut_short = r.op_ == Op::kWrite && result >= 0 && result < b.len;
    if (b.direct && (cut_short || result == -EINVAL)) {
      int64_t done = std::max<int64_t>(result, 0);
      int fd = ::open(path.c_str(), (r.op_ == Op::kRead ? O_RDONLY : O_WRONLY) | O_CLOEXEC);
      int64_t more = fd < 0 ? -errno
                     : r.op_ == Op::kRead ? full_pread(fd, b.buf + done, b.len - done, b.offset + done)
                                          : full_pwrite(fd, b.buf + done, b.len - done, b.offset + done);
      if (fd >= 0) ::close(fd);
      result = more < 0 ? more : done + more;
    }
    Checksums* checksums = engine_.checksums_.get();
    if (checksums && r.op_ == Op::kWrite && result < b.len) checksums->invalidate(path, b.offset, b.len);
    if (result < 0) {
      r.fail({static_cast<int>(-result), path, b.offset, b.len, r.op_ == Op::kRead ? "read" : "write"});
    } else if (result < b.len) {
      std::string what;
      if (r.op_ == Op::kRead) {
        struct stat st {};
        std::string size = ::stat(path.c_str(), &st) == 0 ? std::to_string(st.st_size) : "unknown";
        what = "short read: got " + std::to_string(result) + " of " + std::to_string(b.len) +
               " bytes; the file is " + size + " bytes long (truncated, or never fully written)";
      } else {
        what = "short write: only " + std::to_string(result) + " of " + std::to_string(b.len) + " bytes written";
      }
      r.fail({EIO, path, b.offset, b.len, what});
    } else if (checksums && r.op_ == Op::kWrite) {
      checksums->record(path, b.offset, b.buf, b.len);
      engine_.bytes_written_.fetch_add(b.len);
    } else if (std::optional<ChecksumMismatch> bad = checksums ? checksums->verify(path, b.offset, b.buf, b.len)
                                                               : std::nullopt) {
      char what[160];
      std::snprintf(what, sizeof what,
                    "checksum mismatch: the CRC32C of these bytes was 0x%08x when written and is 0x%08x now",
                    bad->expected, bad->found);
      r.fail({EIO, path, bad->offset, Checksums::kChunk, what});
    } else {
      (r.op_ == Op::kRead ? engine_.bytes_read_ : engine_.bytes_written_).fetch_add(b.len);
    }
    r.block_finished();
  }

  Engine& engine_;
  std::unique_ptr<AsyncQueue> queue_;
  std::vector<Slot> slots_;
  std::vector<int> free_slots_;
  int inflight_ = 0;
  std::vector<char*> bounce_;
  std::vector<char*> free_bounce_;
  std::atomic<int64_t> bounce_count_{0};
  std::thread thread_;
};

// ---------------------------------------------------------------------------------------------------------------
// Engine

Engine::Engine(EngineOptions options) : options_(std::move(options)) {
  if (options_.block_size <= 0 || !is_aligned(options_.block_size)) {
    throw std::invalid_argument("block_size must be a positive multiple of 4096, got " +
                                std::to_string(options_.block_size));
  }
  if (options_.queue_depth < 1 || options_.threads < 1) {
    throw std::invalid_argument("queue_depth and threads must be >= 1");
  }
  if (options_.verify) checksums_ = std::make_unique<Checksums>();
  bool async = options_.backend != "threads";
  // Queues are created here, not in the threads, so that a kernel refusal surfaces to the caller.
  std::vector<std::unique_ptr<AsyncQueue>> queues;
  for (int i = 0; i < options_.threads; ++i) {
    queues.push_back(async ? make_async_queue(options_.backend, options_.queue_depth) : nullptr);
  }
  for (auto& q : queues) workers_.push_back(std::make_unique<Worker>(*this, std::move(q)));
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  workers_.clear();  // joins: each worker exits once the queue is empty and its own transfers finished
}

int64_t Engine::bounce_bytes() const {
  int64_t total = 0;
  for (const auto& w : workers_) total += w->bounce_bytes();
  return total;
}

void Engine::forget_checksums(const std::string& path) {
  if (checksums_) checksums_->forget(path);
}

int64_t Engine::checksummed_bytes() const { return checksums_ ? checksums_->chunks() * Checksums::kChunk : 0; }

std::optional<Block> Engine::pop(bool block) {
  std::unique_lock<std::mutex> lock(mu_);
  if (block) cv_.wait(lock, [this] { return !queue_.empty() || stopping_; });
  if (queue_.empty()) return std::nullopt;
  Block b = std::move(queue_.front());
  queue_.pop_front();
  return b;
}

void Engine::push_blocks(std::vector<Block>& blocks) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (Block& b : blocks) queue_.push_back(std::move(b));
  }
  cv_.notify_all();
}

void Engine::split_piece(const std::shared_ptr<Request>& req, int file, char* buf, int64_t offset, int64_t len,
                         std::vector<Block>& out) const {
  const int64_t bs = options_.block_size;
  auto emit = [&](int64_t from, int64_t to, bool direct) {
    for (int64_t pos = from; pos < to; pos += bs) {
      out.push_back({req, file, buf + (pos - offset), pos, std::min(bs, to - pos), direct});
    }
  };
  if (req->files_[file].direct_fd < 0) {
    emit(offset, offset + len, false);
    return;
  }
  int64_t end = offset + len;
  int64_t body_begin = std::min(align_up(offset), end);
  int64_t body_end = std::max(align_down(end), body_begin);
  emit(offset, body_begin, false);  // unaligned head: less than one 4 KiB block
  emit(body_begin, body_end, true);
  emit(body_end, end, false);       // unaligned tail
}

std::shared_ptr<Request> Engine::submit(Op op, const std::vector<std::string>& paths, int64_t stripe_size,
                                        char* buf, int64_t nbytes, int64_t offset,
                                        std::shared_ptr<void> keep_alive) {
  if (paths.empty()) throw std::invalid_argument("at least one path is needed");
  if (paths.size() > 1 && (stripe_size <= 0 || !is_aligned(stripe_size))) {
    throw std::invalid_argument("stripe_size must be a positive multiple of 4096 when striping");
  }
  if (nbytes < 0 || offset < 0) throw std::invalid_argument("nbytes and offset must be >= 0");

  // Map the logical range onto (file, physical offset) pieces: stripe k lives in file k % n at row k / n.
  struct Piece {
    int file;
    char* buf;
    int64_t offset;
    int64_t len;
  };
  std::vector<Piece> pieces;
  const int64_t n = static_cast<int64_t>(paths.size());
  for (int64_t pos = offset; pos < offset + nbytes;) {
    if (n == 1) {
      pieces.push_back({0, buf, pos, nbytes});
      break;
    }
    int64_t stripe = pos / stripe_size;
    int64_t stop = std::min(offset + nbytes, (stripe + 1) * stripe_size);
    pieces.push_back({static_cast<int>(stripe % n), buf + (pos - offset),
                      (stripe / n) * stripe_size + (pos - stripe * stripe_size), stop - pos});
    pos = stop;
  }

  std::vector<FileHandle> files(paths.size());
  for (size_t i = 0; i < paths.size(); ++i) files[i].path = paths[i];
  auto req = std::make_shared<Request>(op, std::move(files));
  req->nbytes_ = nbytes;
  req->submitted_ns_ = monotonic_ns();
  req->keep_alive_ = std::move(keep_alive);

  const int flags = (op == Op::kRead ? O_RDONLY : O_WRONLY | O_CREAT) | O_CLOEXEC;
  auto open_file = [&](FileHandle& f, bool direct) -> bool {
    int fd = ::open(f.path.c_str(), flags | (direct ? O_DIRECT : 0), 0600);
    if (fd < 0) {
      req->fail({errno, f.path, 0, 0, "open"});
      return false;
    }
    (direct ? f.direct_fd : f.buffered_fd) = fd;
    return true;
  };

  // Open only the files this range touches (a short range of a striped store need not reach them all); a read
  // with nbytes == 0 still opens the first file, so a missing file is reported rather than ignored.
  std::vector<bool> touched(paths.size(), false);
  touched[0] = pieces.empty();
  for (const Piece& p : pieces) touched[p.file] = true;
  bool ok = true;
  for (size_t i = 0; ok && i < paths.size(); ++i) {
    if (!touched[i]) continue;
    FileHandle& f = req->files_[i];
    if (options_.backend == "threads") {
      ok = open_file(f, false);
      continue;
    }
    int fd = ::open(f.path.c_str(), flags | O_DIRECT, 0600);
    if (fd >= 0) {
      f.direct_fd = fd;
    } else if (errno == EINVAL && options_.buffered_fallback) {
      req->used_buffered_fallback_ = true;  // the file system has no O_DIRECT: buffered below
    } else {
      req->fail({errno, f.path, 0, 0, "open"});
      ok = false;
    }
  }

  std::vector<Block> blocks;
  if (ok) {
    for (const Piece& p : pieces) split_piece(req, p.file, p.buf, p.offset, p.len, blocks);
    for (const Block& b : blocks) {
      FileHandle& f = req->files_[b.file];
      if (!b.direct && f.buffered_fd < 0 && !open_file(f, false)) {
        ok = false;
        break;
      }
    }
  }
  if (!ok) blocks.clear();
  req->add_blocks(static_cast<int64_t>(blocks.size()));
  push_blocks(blocks);
  req->block_finished();  // drops submit()'s own count: the request finishes when its last block does
  return req;
}

}  // namespace fuyou
