#include "host_allocator.h"

#include <sys/mman.h>

#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>

namespace fuyou {

int64_t HostBlockCache::size_class(int64_t nbytes) {
  int64_t power = 1;
  while (power * 2 <= nbytes) power *= 2;
  const int64_t step = std::max<int64_t>(power / 8, 4096);
  return (nbytes + step - 1) / step * step;
}

void* HostBlockCache::allocate(int64_t nbytes) {
  const int64_t size = size_class(nbytes);
  std::unique_lock<std::mutex> lock(mu_);
  auto hit = idle_.find(size);
  if (hit != idle_.end()) {
    void* p = hit->second;
    idle_.erase(hit);
    stats_.idle -= size;
    stats_.reuses += 1;
    return hand_out(p, size);
  }
  // A miss. Idle blocks of other classes go, largest first, while the bytes mapped (in use + idle) would pass the
  // peak in use counting this request: RSS then follows the most that large tensors ever held at once. Keeping
  // each class's own peak instead (no eviction) mapped 1.9x that on a 32-layer model, whose phases use different
  // sizes; at 1x, one request in twelve maps afresh.
  const int64_t limit = std::max(stats_.peak_in_use, stats_.in_use + size);
  while (!idle_.empty() && stats_.in_use + stats_.idle + size > limit) {
    auto largest = std::prev(idle_.end());
    ::munmap(largest->second, largest->first);
    stats_.idle -= largest->first;
    stats_.evictions += 1;
    idle_.erase(largest);
  }
  const int64_t in_use = stats_.in_use;
  lock.unlock();
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    TORCH_CHECK_WITH(OutOfMemoryError, false, "fuyou host cache: mapping ", size, " bytes failed (", strerror(err),
                     "); ", in_use, " bytes in use");
  }
  lock.lock();
  stats_.mappings += 1;
  return hand_out(p, size);
}

void* HostBlockCache::hand_out(void* p, int64_t size) {
  in_use_[p] = size;
  stats_.in_use += size;
  stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
  return p;
}

bool HostBlockCache::release(void* ptr) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = in_use_.find(ptr);
  if (it == in_use_.end()) return false;
  stats_.in_use -= it->second;
  stats_.idle += it->second;
  idle_.emplace(it->second, ptr);
  in_use_.erase(it);
  return true;
}

HostCacheStats HostBlockCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

namespace {

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors would have run.
HostBlockCache* g_cache = nullptr;
c10::Allocator* g_previous = nullptr;
c10::DeleterFnPtr g_previous_deleter = nullptr;
std::atomic<bool> g_installed{false};
std::once_flag g_install_once;

// One deleter for every pointer handed out (what `raw_allocate`/`raw_deallocate` need): ours go back to the cache,
// the rest to the allocator that made them.
void release_any(void* ptr) {
  if (ptr != nullptr && !g_cache->release(ptr)) g_previous_deleter(ptr);
}

class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (static_cast<int64_t>(nbytes) >= HostBlockCache::kMinBytes) {
      void* p = g_cache->allocate(static_cast<int64_t>(nbytes));
      return {p, p, &release_any, cpu};
    }
    c10::DataPtr small = g_previous->allocate(nbytes);
    void* p = small.get();
    if (p == nullptr) return {nullptr, nullptr, &release_any, cpu};
    small.release_context();  // ownership passes to release_any, which hands it back to the previous allocator
    return {p, p, &release_any, cpu};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release_any; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

HostBlockCache& install_host_allocator() {
  std::call_once(g_install_once, [] {
    g_previous = c10::GetCPUAllocator();
    g_previous_deleter = g_previous->raw_deleter();
    // Small blocks are handed back through one raw deleter: the allocator in place must work that way.
    c10::DataPtr probe = g_previous->allocate(1);
    TORCH_CHECK(g_previous_deleter != nullptr && probe.get() == probe.get_context() &&
                    probe.get_deleter() == g_previous_deleter,
                "the CPU allocator in place does not free through one raw deleter; the host cache cannot wrap it");
    g_cache = new HostBlockCache();
    static auto* allocator = new CachingCpuAllocator();
    c10::SetCPUAllocator(allocator, /*priority=*/std::numeric_limits<uint8_t>::max());
    g_installed = true;
  });
  return *g_cache;
}

bool host_allocator_installed() { return g_installed; }

}  // namespace fuyou
