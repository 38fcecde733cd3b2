// One kernel submission/completion queue per worker thread: Linux AIO or io_uring behind one small interface,
// so the worker's pipelining logic is written once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common.h"

namespace fuyou {

struct Completion {
  int slot;        // the slot index given to prepare()
  int64_t result;  // bytes moved, or -errno
};

class AsyncQueue {
 public:
  virtual ~AsyncQueue() = default;
  // Stages one O_DIRECT transfer for slot `slot` (0 <= slot < depth); nothing reaches the kernel before submit().
  virtual void prepare(int slot, Op op, int fd, void* buf, int64_t len, int64_t offset) = 0;
  // Hands every staged transfer to the kernel. Returns 0, or -errno for the transfers it could not submit; those
  // are reported back through `rejected` so their slots can be completed with the error.
  virtual int submit(std::vector<int>& rejected) = 0;
  // Blocks until at least `min_complete` transfers finished, then appends every finished one to `out`.
  virtual void wait(int min_complete, std::vector<Completion>& out) = 0;
};

// "aio" (libaio) or "io_uring" (when built with liburing). Throws std::runtime_error with errno text when the
// kernel refuses to set the queue up (e.g. fs.aio-max-nr exhausted, io_uring disabled), so callers can fall back.
std::unique_ptr<AsyncQueue> make_async_queue(const std::string& kind, int depth);

bool io_uring_compiled();

}  // namespace fuyou
