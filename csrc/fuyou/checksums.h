// End-to-end integrity of what the engine wrote: a CRC32C of every whole 4 KiB chunk of each file, taken when a
// write has reached the file and checked when a read brings those bytes back. A byte changed on the SSD, by the
// device or by anyone else, then fails the read that would have fed it to training, instead of being trained on.
//
// The table lives in memory, per engine: swap files live only as long as the process that writes them. Chunks are
// fixed 4 KiB pieces of the file, whatever the transfers that wrote or read them, so a read of part of what one
// write wrote (a parameter partition inside its sub-group's master file) is checked too. A chunk a transfer covers
// only in part (an unaligned head or tail) is forgotten by a write, not checked by a read.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace fuyou {

uint32_t crc32c(const char* data, int64_t len);

struct ChecksumMismatch {
  int64_t offset;  // of the 4 KiB chunk in the file
  uint32_t expected;
  uint32_t found;
};

class Checksums {
 public:
  static constexpr int64_t kChunk = 4096;

  // `data` has just been written at [offset, offset + len) of `path`.
  void record(const std::string& path, int64_t offset, const char* data, int64_t len);
  // [offset, offset + len) of `path` holds unknown bytes (a write that failed part-way).
  void invalidate(const std::string& path, int64_t offset, int64_t len);
  // `path` was replaced by someone other than this engine (e.g. a checkpoint copied into place).
  void forget(const std::string& path);
  // `data` has just been read from [offset, offset + len) of `path`: the first chunk whose checksum differs.
  std::optional<ChecksumMismatch> verify(const std::string& path, int64_t offset, const char* data,
                                         int64_t len) const;
  int64_t chunks() const;  // chunks with a checksum, over every file

 private:
  struct File {
    mutable std::mutex mu;
    std::vector<uint32_t> crc;
    std::vector<uint8_t> known;
  };
  std::shared_ptr<File> file(const std::string& path, bool create) const;

  mutable std::mutex mu_;
  mutable std::unordered_map<std::string, std::shared_ptr<File>> files_;
};

}  // namespace fuyou
