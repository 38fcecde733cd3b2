// One byte budget for every host staging buffer. Buffers are 4 KiB-aligned (valid O_DIRECT targets) and
// page-locked (CUDA host registration where a GPU is present, else mlock where permitted, else plain memory), and
// are cached for reuse after release because pinning is expensive. A request that does not fit waits for a
// release instead of growing past the budget: host memory stays bounded by construction, never an OOM kill.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

namespace fuyou {

struct PoolStats {
  int64_t budget = 0;
  int64_t reserved = 0;       // bytes allocated by the pool: in use + cached idle
  int64_t in_use = 0;         // bytes of the blocks handed out
  int64_t peak_reserved = 0;
  int64_t peak_in_use = 0;
  int64_t locked = 0;         // bytes actually page-locked (CUDA-registered or mlocked)
  int64_t allocations = 0;    // fresh blocks (cache misses)
  int64_t waits = 0;          // acquires that had to wait for a release
  std::string lock_mode;      // "cuda", "mlock" or "none": how new blocks are locked
};

class PinnedPool : public std::enable_shared_from_this<PinnedPool> {
 public:
  // lock_mode: "auto" (cuda if compiled in and a device exists, else mlock), "cuda", "mlock" or "none".
  PinnedPool(int64_t budget, const std::string& lock_mode);
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  // A block of at least `nbytes` (rounded up to 4 KiB), or nullptr when none fit before `timeout_s` (< 0:
  // forever). Throws std::length_error when `nbytes` exceeds the whole budget: waiting could never succeed.
  void* acquire(int64_t nbytes, double timeout_s);
  void release(void* ptr);
  void trim();  // frees every cached idle block (e.g. before the budget is handed to something else)
  PoolStats stats() const;

 private:
  void* allocate_locked(int64_t size, bool* locked);
  void free_block(void* ptr, int64_t size);

  const int64_t budget_;
  std::string lock_mode_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<void*, int64_t> in_use_;
  std::multimap<int64_t, void*> idle_;  // size -> block, for best-fit reuse
  std::unordered_map<void*, bool> locked_;
  PoolStats stats_;
};

bool cuda_compiled();

}  // namespace fuyou
