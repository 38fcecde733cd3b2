// Host memory for large CPU tensors: whole mappings cached by size class, so that RSS follows what is in use.
//
// glibc serves large blocks from its heap once its dynamic mmap threshold has risen (to the size of every mapped
// block freed, up to 32 MiB), and the small allocations that land between them (tensor headers, Python objects)
// keep the freed holes from being reused or returned. On the CPU accelerator, where gathered layers, gradients and
// activations are host memory, the backward of a 32-layer model left 1.2 GiB free in the heap against 0.18 GiB in
// use. Here a block of at least kMinBytes is its own mapping, rounded up to one of eight size classes per power of
// two; a freed block waits in its class for the next step's identical request (no page faults, no zeroing), and a
// request that misses first unmaps idle blocks of other classes while the bytes mapped would exceed the peak of
// bytes in use.
// Smaller requests go to the allocator that was in place before.
#pragma once

#include <c10/core/Allocator.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>

namespace fuyou {

struct HostCacheStats {
  int64_t in_use = 0;       // bytes of the blocks handed out (rounded to their class)
  int64_t idle = 0;         // bytes mapped and waiting for reuse
  int64_t peak_in_use = 0;
  int64_t mappings = 0;     // fresh mappings (cache misses)
  int64_t reuses = 0;       // requests served from the cache
  int64_t evictions = 0;    // idle blocks unmapped to keep mapped bytes within the peak in use
};

class HostBlockCache {
 public:
  static constexpr int64_t kMinBytes = 128 << 10;  // glibc's initial mmap threshold
  static int64_t size_class(int64_t nbytes);

  void* allocate(int64_t nbytes);
  bool release(void* ptr);  // false when `ptr` is not one of ours
  HostCacheStats stats() const;

 private:
  void* hand_out(void* p, int64_t size);  // records a block as in use; `mu_` held

  mutable std::mutex mu_;
  std::unordered_map<void*, int64_t> in_use_;
  std::multimap<int64_t, void*> idle_;  // size class -> block
  HostCacheStats stats_;
};

// Installs the caching allocator as torch's CPU allocator (once per process; later calls do nothing) and returns
// its cache. Tensors allocated before keep their own deleters, so installing it mid-run is safe.
HostBlockCache& install_host_allocator();
bool host_allocator_installed();

}  // namespace fuyou
