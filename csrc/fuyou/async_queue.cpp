#include "async_queue.h"

#include <libaio.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#ifdef FUYOU_WITH_URING
#include <liburing.h>
#endif

namespace fuyou {
namespace {

std::runtime_error setup_error(const std::string& what, int err) {
  return std::runtime_error(what + " failed: " + std::strerror(err) + " (errno " + std::to_string(err) + ")");
}

class AioQueue final : public AsyncQueue {
 public:
  explicit AioQueue(int depth) : iocbs_(depth), events_(depth) {
    int rc = io_setup(depth, &ctx_);
    if (rc < 0) throw setup_error("io_setup(" + std::to_string(depth) + ")", -rc);
  }
  ~AioQueue() override { io_destroy(ctx_); }

  void prepare(int slot, Op op, int fd, void* buf, int64_t len, int64_t offset) override {
    iocb* cb = &iocbs_[slot];
    if (op == Op::kRead) {
      io_prep_pread(cb, fd, buf, len, offset);
    } else {
      io_prep_pwrite(cb, fd, buf, len, offset);
    }
    cb->data = reinterpret_cast<void*>(static_cast<intptr_t>(slot));
    staged_.push_back(cb);
  }

  int submit(std::vector<int>& rejected) override {
    size_t next = 0;
    int err = 0;
    while (next < staged_.size()) {
      int rc = io_submit(ctx_, staged_.size() - next, staged_.data() + next);
      if (rc == -EAGAIN || rc == -EINTR) continue;  // transient: the kernel is short of request slots
      if (rc < 0) {
        err = rc;
        break;
      }
      next += rc;
    }
    for (size_t i = next; i < staged_.size(); ++i) {
      rejected.push_back(static_cast<int>(reinterpret_cast<intptr_t>(staged_[i]->data)));
    }
    staged_.clear();
    return err;
  }

  void wait(int min_complete, std::vector<Completion>& out) override {
    int n;
    do {
      n = io_getevents(ctx_, min_complete, events_.size(), events_.data(), nullptr);
    } while (n == -EINTR);
    if (n < 0) throw setup_error("io_getevents", -n);
    for (int i = 0; i < n; ++i) {
      // Linux AIO splits the byte count across res (low) and res2; res carries -errno on failure.
      int64_t res = static_cast<int64_t>(static_cast<long>(events_[i].res));
      out.push_back({static_cast<int>(reinterpret_cast<intptr_t>(events_[i].data)), res});
    }
  }

 private:
  io_context_t ctx_ = nullptr;
  std::vector<iocb> iocbs_;
  std::vector<iocb*> staged_;
  std::vector<io_event> events_;
};

#ifdef FUYOU_WITH_URING
class UringQueue final : public AsyncQueue {
 public:
  explicit UringQueue(int depth) {
    int rc = io_uring_queue_init(depth, &ring_, 0);
    if (rc < 0) throw setup_error("io_uring_queue_init(" + std::to_string(depth) + ")", -rc);
  }
  ~UringQueue() override { io_uring_queue_exit(&ring_); }

  void prepare(int slot, Op op, int fd, void* buf, int64_t len, int64_t offset) override {
    // Never more staged than `depth` slots in flight, and the ring has `depth` entries: an SQE is always free.
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (op == Op::kRead) {
      io_uring_prep_read(sqe, fd, buf, static_cast<unsigned>(len), offset);
    } else {
      io_uring_prep_write(sqe, fd, buf, static_cast<unsigned>(len), offset);
    }
    io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(slot));
    staged_.push_back(slot);
  }

  int submit(std::vector<int>& rejected) override {
    int remaining = static_cast<int>(staged_.size());
    int err = 0;
    while (remaining > 0) {
      int rc = io_uring_submit(&ring_);
      if (rc == -EAGAIN || rc == -EINTR) continue;
      if (rc < 0) {
        err = rc;
        break;
      }
      remaining -= rc;
    }
    // SQEs the kernel did not take stay in the ring and would be submitted later: only a hard error leaves any,
    // and then the ring is unusable, so report them as failed.
    for (int i = static_cast<int>(staged_.size()) - remaining; i < static_cast<int>(staged_.size()); ++i) {
      rejected.push_back(staged_[i]);
    }
    staged_.clear();
    return err;
  }

  void wait(int min_complete, std::vector<Completion>& out) override {
    io_uring_cqe* cqe = nullptr;
    if (min_complete > 0) {
      int rc;
      do {
        rc = io_uring_wait_cqe_nr(&ring_, &cqe, min_complete);
      } while (rc == -EINTR);
      if (rc < 0) throw setup_error("io_uring_wait_cqe", -rc);
    }
    unsigned head;
    unsigned seen = 0;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      out.push_back({static_cast<int>(io_uring_cqe_get_data64(cqe)), static_cast<int64_t>(cqe->res)});
      ++seen;
    }
    io_uring_cq_advance(&ring_, seen);
  }

 private:
  io_uring ring_{};
  std::vector<int> staged_;
};
#endif

}  // namespace

bool io_uring_compiled() {
#ifdef FUYOU_WITH_URING
  return true;
#else
  return false;
#endif
}

std::unique_ptr<AsyncQueue> make_async_queue(const std::string& kind, int depth) {
  if (kind == "aio") return std::make_unique<AioQueue>(depth);
#ifdef FUYOU_WITH_URING
  if (kind == "io_uring") return std::make_unique<UringQueue>(depth);
#endif
  throw std::invalid_argument("async queue kind '" + kind + "' is not available in this build");
}

}  // namespace fuyou
