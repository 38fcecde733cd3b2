#include "pinned_pool.h"

#include <sys/mman.h>

#include <chrono>
#include <new>
#include <stdexcept>
#include <vector>

#include "common.h"

#ifdef FUYOU_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fuyou {
namespace {

bool cuda_device_present() {
#ifdef FUYOU_WITH_CUDA
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
#else
  return false;
#endif
}

}  // namespace

bool cuda_compiled() {
#ifdef FUYOU_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PinnedPool::PinnedPool(int64_t budget, const std::string& lock_mode) : budget_(budget) {
  if (budget <= 0) throw std::invalid_argument("pinned budget must be > 0 bytes");
  if (lock_mode == "auto") {
    lock_mode_ = cuda_device_present() ? "cuda" : "mlock";
  } else if (lock_mode == "cuda" && !cuda_device_present()) {
    throw std::invalid_argument("lock mode 'cuda' needs a CUDA build of the extension and a visible GPU");
  } else if (lock_mode == "cuda" || lock_mode == "mlock" || lock_mode == "none") {
    lock_mode_ = lock_mode;
  } else {
    throw std::invalid_argument("lock mode must be auto, cuda, mlock or none, got '" + lock_mode + "'");
  }
  stats_.budget = budget;
  stats_.lock_mode = lock_mode_;
}

PinnedPool::~PinnedPool() {
  // Handed-out blocks keep the pool alive (their tensors' deleters hold a reference), so only idle ones remain.
  trim();
}

void* PinnedPool::allocate_locked(int64_t size, bool* locked) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  *locked = false;
#ifdef FUYOU_WITH_CUDA
  if (lock_mode_ == "cuda") *locked = cudaHostRegister(p, size, cudaHostRegisterDefault) == cudaSuccess;
#endif
  // mlock fails without CAP_IPC_LOCK beyond RLIMIT_MEMLOCK: the memory then stays pageable, and stats say so.
  if (!*locked && lock_mode_ != "none") *locked = ::mlock(p, size) == 0;
  return p;
}

void PinnedPool::free_block(void* ptr, int64_t size) {
  auto it = locked_.find(ptr);
  bool was_locked = it != locked_.end() && it->second;
  if (it != locked_.end()) locked_.erase(it);
  if (was_locked) {
    stats_.locked -= size;
#ifdef FUYOU_WITH_CUDA
    if (lock_mode_ == "cuda" && cudaHostUnregister(ptr) == cudaSuccess) was_locked = false;
#endif
    if (was_locked) ::munlock(ptr, size);
  }
  ::munmap(ptr, size);
  stats_.reserved -= size;
}

void* PinnedPool::acquire(int64_t nbytes, double timeout_s) {
  const int64_t size = align_up(std::max<int64_t>(nbytes, 1));
  if (size > budget_) {
    throw std::length_error("a buffer of " + std::to_string(nbytes) + " bytes exceeds the whole pinned budget of " +
                            std::to_string(budget_) + " bytes");
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(std::max(timeout_s, 0.0));
  std::unique_lock<std::mutex> lock(mu_);
  bool counted_wait = false;
  while (true) {
    // Best fit among cached blocks, but never more than twice the size asked for.
    auto fit = idle_.lower_bound(size);
    if (fit != idle_.end() && fit->first < 2 * size) {
      void* p = fit->second;
      int64_t got = fit->first;
      idle_.erase(fit);
      in_use_[p] = got;
      stats_.in_use += got;
      stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
      return p;
    }
    // Make room by dropping cached blocks that do not fit this request, largest first.
    while (stats_.reserved + size > budget_ && !idle_.empty()) {
      auto largest = std::prev(idle_.end());
      void* p = largest->second;
      int64_t s = largest->first;
      idle_.erase(largest);
      free_block(p, s);
    }
    if (stats_.reserved + size <= budget_) {
      stats_.reserved += size;  // claim the bytes before unlocking: pinning a large block takes a while
      lock.unlock();
      bool locked = false;
      void* p = nullptr;
      try {
        p = allocate_locked(size, &locked);
      } catch (...) {
        lock.lock();
        stats_.reserved -= size;
        cv_.notify_all();
        throw;
      }
      lock.lock();
      in_use_[p] = size;
      locked_[p] = locked;
      if (locked) stats_.locked += size;
      stats_.in_use += size;
      stats_.allocations += 1;
      stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
      stats_.peak_reserved = std::max(stats_.peak_reserved, stats_.reserved);
      return p;
    }
    if (!counted_wait) {
      stats_.waits += 1;
      counted_wait = true;
    }
    if (timeout_s < 0) {
      cv_.wait(lock);
    } else if (cv_.wait_until(lock, deadline) == std::cv_status::timeout &&
               std::chrono::steady_clock::now() >= deadline) {
      return nullptr;
    }
  }
}

void PinnedPool::release(void* ptr) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = in_use_.find(ptr);
    if (it == in_use_.end()) return;
    stats_.in_use -= it->second;
    idle_.emplace(it->second, ptr);
    in_use_.erase(it);
  }
  cv_.notify_all();
}

void PinnedPool::trim() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [size, ptr] : idle_) free_block(ptr, size);
  idle_.clear();
}

PoolStats PinnedPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace fuyou
