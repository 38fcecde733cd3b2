// One byte budget for every host staging buffer. Buffers are 4 KiB-aligned (valid O_DIRECT targets) and
// page-locked (CUDA host registration where a GPU is present, else mlock where permitted, else plain memory).
//
// Pinning is expensive, so the pool keeps what it pinned: it maps slabs and carves buffers out of them, and a
// released buffer's range merges with its free neighbours in the slab. Carving matters because a training step
// has phases with different buffer sizes (per-parameter staging in forward/backward, whole sub-groups in the
// optimizer step): a cache of whole blocks would hold both phases' blocks, about twice what is ever in use at
// once; with carving the step's large slabs serve forward's small buffers too. A request that no free range
// fits first unmaps slabs that are wholly free while the pool would otherwise hold more than it ever had in use
// at once, and never maps past the budget: it waits for a release instead. Host memory stays bounded by
// construction, never an OOM kill.
//
// Carving buffers of different sizes leaves free pieces between buffers still in use, too small for a larger
// request (a layer's partitions differ in size). A request the budget has room for but no free range fits then
// unmaps such pieces and maps a slab of its own: a buffer waits only for bytes in use, never for free bytes in the
// wrong place. A CUDA registration can only be undone whole, so pieces of registered slabs stay (`room_for`).
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
  int64_t reserved = 0;       // bytes of the slabs the pool holds: in use + free
  int64_t in_use = 0;         // bytes of the buffers handed out
  int64_t peak_reserved = 0;
  int64_t peak_in_use = 0;
  int64_t locked = 0;         // bytes actually page-locked (CUDA-registered or mlocked)
  int64_t allocations = 0;    // slabs mapped (requests no free range could serve)
  int64_t evictions = 0;      // wholly free slabs unmapped to make room or to stay near the peak in use
  int64_t pieces_unmapped = 0;  // free ranges of partly used slabs unmapped so that a larger buffer fits
  int64_t waits = 0;          // acquires that had to wait for a release
  std::string lock_mode;      // "cuda", "mlock" or "none": how new slabs are locked
};

class PinnedPool : public std::enable_shared_from_this<PinnedPool> {
 public:
  // lock_mode: "auto" (cuda if compiled in and a device exists, else mlock), "cuda", "mlock" or "none".
  PinnedPool(int64_t budget, const std::string& lock_mode);
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  // A buffer of at least `nbytes` (rounded up to 4 KiB), or nullptr when none fit before `timeout_s` (< 0:
  // forever). Throws std::length_error when `nbytes` exceeds the whole budget: waiting could never succeed.
  void* acquire(int64_t nbytes, double timeout_s);
  void release(void* ptr);
  void trim();  // unmaps every wholly free slab (e.g. before the budget is handed to something else)
  // How many buffers of `nbytes` (rounded up to 4 KiB) could be handed out now, one after another, without waiting:
  // every free byte that can be unmapped counts, as does the budget not mapped; of CUDA-registered slabs, only free
  // ranges that hold a whole buffer. This is what a caller that must not wait can rely on.
  int64_t room_for(int64_t nbytes);
  PoolStats stats() const;

 private:
  struct Slab {
    int64_t size = 0;
    bool locked = false;
    bool registered = false;  // locked by CUDA host registration, which can only be undone for the whole slab
  };
  using SlabMap = std::map<char*, Slab>;  // by base address, to find the slab a buffer lies in

  char* carve(int64_t size);  // best fit among the free ranges, splitting it; nullptr when none is large enough
  void evict_free_slabs(int64_t keep);  // smallest first, while reserved > keep
  void unmap(SlabMap::iterator slab);
  void unmap_free_pieces(int64_t keep);  // free ranges of unregistered slabs, largest first, while reserved > keep
  void unmap_piece(char* p, int64_t length);  // one free range of a partly used slab, splitting the slab around it
  SlabMap::iterator slab_of(char* p);
  bool wholly_free(SlabMap::const_iterator slab) const;
  void add_free(char* p, int64_t size);     // a released range, merged with its free neighbours
  void insert_free(char* p, int64_t size);  // records a free range as it is
  void remove_free(char* p);

  const int64_t budget_;
  std::string lock_mode_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  SlabMap slabs_;
  std::map<char*, int64_t> free_by_address_;       // start -> length, to merge neighbours
  std::multimap<int64_t, char*> free_by_size_;     // length -> start, for best fit
  std::unordered_map<void*, int64_t> in_use_;
  PoolStats stats_;
};

bool cuda_compiled();

}  // namespace fuyou
