#include "common.h"

#include <cerrno>
#include <unistd.h>

namespace fuyou {

int64_t full_pread(int fd, void* buf, int64_t len, int64_t offset) {
  int64_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd, static_cast<char*>(buf) + done, len - done, offset + done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) break;  // end of file: the caller decides whether that is short
    done += n;
  }
  return done;
}

int64_t full_pwrite(int fd, const void* buf, int64_t len, int64_t offset) {
  int64_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd, static_cast<const char*>(buf) + done, len - done, offset + done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) break;
    done += n;
  }
  return done;
}

}  // namespace fuyou
