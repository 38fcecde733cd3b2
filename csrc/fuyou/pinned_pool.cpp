#include "pinned_pool.h"

#include <sys/mman.h>

#include <algorithm>
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
  // Handed-out buffers keep the pool alive (their tensors' deleters hold a reference), so every slab is free here.
  trim();
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
    char* p = carve(size);
    if (p == nullptr) {
      // A new slab is needed. Wholly free slabs are all smaller than `size` (else carve had found one): unmap them
      // while the pool would otherwise hold more than the most it ever had in use at once, or than the budget.
      evict_free_slabs(std::max(stats_.peak_in_use, stats_.in_use + size) - size);
      if (stats_.reserved + size > budget_ && stats_.in_use + size <= budget_) unmap_free_pieces(budget_ - size);
      if (stats_.reserved + size <= budget_) {
        stats_.reserved += size;  // claim the bytes before unlocking: pinning a large slab takes a while
        lock.unlock();
        Slab slab{size, false, false};
        void* mapped = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mapped == MAP_FAILED) {
          lock.lock();
          stats_.reserved -= size;
          cv_.notify_all();
          throw std::bad_alloc();
        }
        p = static_cast<char*>(mapped);
#ifdef FUYOU_WITH_CUDA
        if (lock_mode_ == "cuda") {
          slab.registered = cudaHostRegister(p, size, cudaHostRegisterDefault) == cudaSuccess;
          slab.locked = slab.registered;
        }
#endif
        // mlock fails without CAP_IPC_LOCK beyond RLIMIT_MEMLOCK: the slab then stays pageable, and stats say so.
        if (!slab.locked && lock_mode_ != "none") slab.locked = ::mlock(p, size) == 0;
        lock.lock();
        slabs_.emplace(p, slab);
        if (slab.locked) stats_.locked += size;
        stats_.allocations += 1;
        stats_.peak_reserved = std::max(stats_.peak_reserved, stats_.reserved);
      }
    }
    if (p != nullptr) {
      in_use_[p] = size;
      stats_.in_use += size;
      stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
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

char* PinnedPool::carve(int64_t size) {
  auto fit = free_by_size_.lower_bound(size);
  if (fit == free_by_size_.end()) return nullptr;
  char* p = fit->second;
  const int64_t length = fit->first;
  remove_free(p);
  // The rest stays free; its neighbours cannot be free too (free ranges are always merged), so no merge here.
  if (length > size) insert_free(p + size, length - size);
  return p;
}

void PinnedPool::release(void* ptr) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = in_use_.find(ptr);
    if (it == in_use_.end()) return;
    char* p = static_cast<char*>(ptr);
    const int64_t size = it->second;
    in_use_.erase(it);
    stats_.in_use -= size;
    add_free(p, size);
  }
  cv_.notify_all();
}

void PinnedPool::add_free(char* p, int64_t size) {
  // Merge with the free ranges on either side, within the same slab only: slabs are separate mappings that the
  // kernel may still have placed next to each other.
  auto slab = slab_of(p);
  char* const slab_begin = slab->first;
  char* const slab_end = slab->first + slab->second.size;
  auto next = free_by_address_.find(p + size);
  if (next != free_by_address_.end() && next->first < slab_end) {
    size += next->second;
    remove_free(next->first);
  }
  auto after = free_by_address_.lower_bound(p);
  if (after != free_by_address_.begin()) {
    auto prev = std::prev(after);
    if (prev->first >= slab_begin && prev->first + prev->second == p) {
      p = prev->first;
      size += prev->second;
      remove_free(p);
    }
  }
  insert_free(p, size);
}

void PinnedPool::insert_free(char* p, int64_t size) {
  free_by_address_.emplace(p, size);
  free_by_size_.emplace(size, p);
}

void PinnedPool::remove_free(char* p) {
  auto by_address = free_by_address_.find(p);
  auto [first, last] = free_by_size_.equal_range(by_address->second);
  for (auto it = first; it != last; ++it) {
    if (it->second == p) {
      free_by_size_.erase(it);
      break;
    }
  }
  free_by_address_.erase(by_address);
}

PinnedPool::SlabMap::iterator PinnedPool::slab_of(char* p) { return std::prev(slabs_.upper_bound(p)); }

bool PinnedPool::wholly_free(SlabMap::const_iterator slab) const {
  auto range = free_by_address_.find(slab->first);  // free ranges are merged: a free slab is one range
  return range != free_by_address_.end() && range->second == slab->second.size;
}

void PinnedPool::evict_free_slabs(int64_t keep) {
  std::vector<SlabMap::iterator> free_slabs;
  for (auto it = slabs_.begin(); it != slabs_.end(); ++it) {
    if (wholly_free(it)) free_slabs.push_back(it);
  }
  std::sort(free_slabs.begin(), free_slabs.end(),
            [](const auto& a, const auto& b) { return a->second.size < b->second.size; });
  for (auto slab : free_slabs) {
    if (stats_.reserved <= keep) break;
    unmap(slab);
    stats_.evictions += 1;
  }
}

void PinnedPool::unmap(SlabMap::iterator slab) {
  char* base = slab->first;
  const Slab s = slab->second;
  remove_free(base);  // a wholly free slab is one free range
  slabs_.erase(slab);
  if (s.locked) {
    stats_.locked -= s.size;
    bool still_locked = true;
#ifdef FUYOU_WITH_CUDA
    if (s.registered && cudaHostUnregister(base) == cudaSuccess) still_locked = false;
#endif
    if (still_locked) ::munlock(base, s.size);
  }
  ::munmap(base, s.size);
  stats_.reserved -= s.size;
}

void PinnedPool::unmap_free_pieces(int64_t keep) {
  std::vector<std::pair<int64_t, char*>> pieces;  // length, start
  for (const auto& [start, length] : free_by_address_) {
    if (!slab_of(start)->second.registered) pieces.emplace_back(length, start);
  }
  std::sort(pieces.begin(), pieces.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (const auto& [length, start] : pieces) {
    if (stats_.reserved <= keep) break;
    unmap_piece(start, length);
    stats_.pieces_unmapped += 1;
  }
}

void PinnedPool::unmap_piece(char* p, int64_t length) {
  // `acquire` evicts the wholly free slabs first, so a buffer in use lies beside every piece in its slab: the slab
  // keeps a head, a tail or both.
  auto slab = slab_of(p);
  char* const base = slab->first;
  const Slab whole = slab->second;
  remove_free(p);
  char* const end = p + length;
  if (end < base + whole.size) slabs_.emplace(end, Slab{base + whole.size - end, whole.locked, false});
  if (p > base) {
    slab->second.size = p - base;
  } else {
    slabs_.erase(slab);
  }
  if (whole.locked) {
    stats_.locked -= length;
    ::munlock(p, length);
  }
  ::munmap(p, length);
  stats_.reserved -= length;
}

void PinnedPool::trim() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = slabs_.begin(); it != slabs_.end();) {
    auto slab = it++;
    if (wholly_free(slab)) unmap(slab);
  }
}

int64_t PinnedPool::room_for(int64_t nbytes) {
  const int64_t size = align_up(std::max<int64_t>(nbytes, 1));
  std::lock_guard<std::mutex> lock(mu_);
  int64_t mappable = budget_ - stats_.reserved;  // bytes new slabs may take, once the free ones are unmapped
  int64_t in_registered_ranges = 0;
  for (const auto& [start, length] : free_by_address_) {
    if (slab_of(start)->second.registered) {
      in_registered_ranges += length / size;
    } else {
      mappable += length;
    }
  }
  return in_registered_ranges + mappable / size;
}

PoolStats PinnedPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace fuyou
