// The file I/O engine: whole-tensor or byte-range reads and writes at file offsets, optionally striped over
// several files (one per SSD), executed by worker threads that each keep up to `queue_depth` O_DIRECT transfers
// in flight. Alignment is handled here, never by the caller:
//   * the 4 KiB-aligned middle of a transfer goes straight between the caller's memory and the device when the
//     memory is aligned too, otherwise through per-worker bounce blocks;
//   * the unaligned head and tail (a file offset or size that is not a multiple of 4 KiB) go through a buffered
//     descriptor of the same file, which the kernel keeps coherent with O_DIRECT.
// Every byte is accounted for: a short read or write is an error, never a silent truncation; with `verify`, a read
// of bytes this engine wrote that no longer have their checksum is an error too (see checksums.h).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checksums.h"
#include "common.h"

namespace fuyou {

// Bounce blocks (block_size each) a worker may allocate for transfers whose memory is not 4 KiB-aligned: enough
// to keep such transfers pipelined without letting them hold queue_depth x block_size of memory each.
constexpr size_t kBounceBlocksPerWorker = 8;

struct EngineOptions {
  std::string backend = "aio";  // "aio", "io_uring" or "threads" (buffered pread/pwrite)
  int64_t block_size = 1 << 20;
  int queue_depth = 32;
  int threads = 4;
  // When a file system refuses O_DIRECT (EINVAL at open, e.g. ramfs or some FUSE), use buffered I/O for that file
  // instead of failing. The request records it so the Python layer can announce it once per directory.
  bool buffered_fallback = true;
  // CRC32C of every 4 KiB written, checked on every read of it (checksums.h).
  bool verify = true;
};

// One file of a (possibly striped) transfer, opened once per request.
struct FileHandle {
  std::string path;
  int direct_fd = -1;    // O_DIRECT descriptor, -1 for the threads backend or when the file system refuses it
  int buffered_fd = -1;  // opened when a piece of the transfer cannot use O_DIRECT
};

// A user-visible transfer. Completion handles share it with the in-flight blocks; it finishes only when every
// block has finished, so the caller's memory is never touched after wait() returns.
class Request {
 public:
  Request(Op op, std::vector<FileHandle> files) : op_(op), files_(std::move(files)) {}
  ~Request();
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;

  // Blocks up to `timeout_s` (< 0: forever). Returns whether the request finished.
  bool wait(double timeout_s);
  bool done() const;
  std::optional<IOError> error() const;
  bool used_buffered_fallback() const { return used_buffered_fallback_; }
  int64_t nbytes() const { return nbytes_; }
  // CLOCK_MONOTONIC nanoseconds (Python's time.monotonic_ns) of submission and of the last block's end (0 while in
  // flight): the timeline `deepspeed_fuyou.trace` draws.
  int64_t submitted_ns() const { return submitted_ns_; }
  int64_t finished_ns() const { return finished_ns_.load(); }

 private:
  friend class Engine;
  friend class Worker;
  void add_blocks(int64_t n) { pending_.fetch_add(n); }
  void fail(IOError err);  // first error wins
  void block_finished();
  void close_files();
  bool failed() const { return failed_.load(std::memory_order_relaxed); }

  Op op_;
  std::vector<FileHandle> files_;
  std::shared_ptr<void> keep_alive_;
  int64_t nbytes_ = 0;
  int64_t submitted_ns_ = 0;
  std::atomic<int64_t> finished_ns_{0};
  bool used_buffered_fallback_ = false;
  std::atomic<int64_t> pending_{1};  // one extra count held by submit() until every block is queued
  std::atomic<bool> failed_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool finished_ = false;
  std::optional<IOError> error_;
};

// One piece of a request, at most block_size bytes, that targets one file.
struct Block {
  std::shared_ptr<Request> req;
  int file;        // index into req->files_
  char* buf;       // caller's memory for this piece
  int64_t offset;  // physical offset in that file
  int64_t len;
  bool direct;     // O_DIRECT-eligible: offset and len are 4 KiB multiples and the file has a direct descriptor
};

class Worker;

class Engine {
 public:
  explicit Engine(EngineOptions options);
  ~Engine();  // drains every queued and in-flight block before the workers exit
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Starts a transfer of `nbytes` at `buf` to/from the logical byte range [offset, offset+nbytes) of `paths`
  // striped in units of `stripe_size` (paths[k % n] holds logical stripe k). Opening errors finish the request at
  // once with an error; they are reported by the request, like I/O errors, never thrown.
  // `keep_alive` owns the memory at `buf` (e.g. the tensor) until the last block has finished with it.
  std::shared_ptr<Request> submit(Op op, const std::vector<std::string>& paths, int64_t stripe_size, char* buf,
                                  int64_t nbytes, int64_t offset, std::shared_ptr<void> keep_alive = nullptr);

  const EngineOptions& options() const { return options_; }
  int64_t bytes_read() const { return bytes_read_.load(); }
  int64_t bytes_written() const { return bytes_written_.load(); }
  int64_t bounce_bytes() const;  // bounce memory the workers hold (allocated lazily, kept for reuse)
  // Drops the checksums of `path`, which someone other than this engine has replaced (no-op without `verify`).
  void forget_checksums(const std::string& path);
  int64_t checksummed_bytes() const;  // bytes of the files whose checksums are known

 private:
  friend class Worker;
  std::optional<Block> pop(bool block);  // next queued block; nullopt when none (or, blocking, at shutdown)
  void push_blocks(std::vector<Block>& blocks);
  void split_piece(const std::shared_ptr<Request>& req, int file, char* buf, int64_t offset, int64_t len,
                   std::vector<Block>& out) const;

  EngineOptions options_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Block> queue_;
  bool stopping_ = false;
  std::atomic<int64_t> bytes_read_{0};
  std::atomic<int64_t> bytes_written_{0};
  std::unique_ptr<Checksums> checksums_;  // null without `verify`
  std::vector<std::unique_ptr<Worker>> workers_;
};

}  // namespace fuyou
