// Shared definitions of the native core: alignment, I/O errors and whole-transfer helpers.
#pragma once

#include <cstdint>
#include <string>

namespace fuyou {

// O_DIRECT needs buffer address, file offset and length aligned to the device's logical block. 4 KiB covers
// every NVMe and 512e/4Kn disk we target, and matches the page size, so the pinned pool hands out buffers that
// are always valid O_DIRECT targets.
constexpr int64_t kAlign = 4096;

inline int64_t align_down(int64_t x, int64_t a = kAlign) { return x - (x % a); }
inline int64_t align_up(int64_t x, int64_t a = kAlign) { return align_down(x + a - 1, a); }
inline bool is_aligned(int64_t x, int64_t a = kAlign) { return x % a == 0; }

enum class Op { kRead, kWrite };

// What went wrong with one piece of a transfer: enough for the Python layer to raise FuyouIOError with the
// physical file, offset, size and errno (EIO for a short read/write, which the kernel reports as a count).
struct IOError {
  int err = 0;
  std::string path;
  int64_t offset = 0;
  int64_t nbytes = 0;
  std::string what;
};

// pread/pwrite until `len` bytes moved, retrying EINTR and partial transfers. Returns the bytes moved (less than
// `len` only at end of file for reads, or when a write makes no progress) or -errno.
int64_t full_pread(int fd, void* buf, int64_t len, int64_t offset);
int64_t full_pwrite(int fd, const void* buf, int64_t len, int64_t offset);

}  // namespace fuyou
