#include "checksums.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace fuyou {

namespace {

constexpr int64_t kChunk = Checksums::kChunk;

// CRC32C (Castagnoli), reflected, as in iSCSI, ext4 and NVMe: the polynomial the CPU's crc32 instruction computes.
constexpr uint32_t kPolynomial = 0x82F63B78u;

struct Table {
  uint32_t entry[256];
  Table() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPolynomial : c >> 1;
      entry[i] = c;
    }
  }
};

uint32_t update_portable(uint32_t crc, const char* data, int64_t len) {
  static const Table table;
  const auto* p = reinterpret_cast<const unsigned char*>(data);
  for (int64_t i = 0; i < len; ++i) crc = table.entry[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
bool has_crc_instruction() {
  static const bool supported = __builtin_cpu_supports("sse4.2");
  return supported;
}

__attribute__((target("sse4.2"))) uint32_t update_sse42(uint32_t crc, const char* data, int64_t len) {
  uint64_t c = crc;
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t word;
    std::memcpy(&word, data + i, 8);
    c = _mm_crc32_u64(c, word);
  }
  for (; i < len; ++i) c = _mm_crc32_u8(static_cast<uint32_t>(c), static_cast<unsigned char>(data[i]));
  return static_cast<uint32_t>(c);
}

// Three chunks at once: the instruction's latency is three times its issue rate, and chunks are independent.
__attribute__((target("sse4.2"))) void chunks_sse42(const char* data, int64_t count, uint32_t* out) {
  int64_t i = 0;
  for (; i + 3 <= count; i += 3) {
    const char* a = data + i * kChunk;
    const char* b = a + kChunk;
    const char* c = b + kChunk;
    uint64_t x = 0xFFFFFFFFu, y = 0xFFFFFFFFu, z = 0xFFFFFFFFu;
    for (int64_t k = 0; k < kChunk; k += 8) {
      uint64_t wa, wb, wc;
      std::memcpy(&wa, a + k, 8);
      std::memcpy(&wb, b + k, 8);
      std::memcpy(&wc, c + k, 8);
      x = _mm_crc32_u64(x, wa);
      y = _mm_crc32_u64(y, wb);
      z = _mm_crc32_u64(z, wc);
    }
    out[i] = ~static_cast<uint32_t>(x);
    out[i + 1] = ~static_cast<uint32_t>(y);
    out[i + 2] = ~static_cast<uint32_t>(z);
  }
  for (; i < count; ++i) out[i] = ~update_sse42(0xFFFFFFFFu, data + i * kChunk, kChunk);
}
#endif

uint32_t update(uint32_t crc, const char* data, int64_t len) {
#if defined(__x86_64__)
  if (has_crc_instruction()) return update_sse42(crc, data, len);
#endif
  return update_portable(crc, data, len);
}

// The checksums of `count` consecutive whole chunks starting at `data`.
void chunk_checksums(const char* data, int64_t count, uint32_t* out) {
#if defined(__x86_64__)
  if (has_crc_instruction()) {
    chunks_sse42(data, count, out);
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) out[i] = ~update_portable(0xFFFFFFFFu, data + i * kChunk, kChunk);
}

// The whole chunks of [offset, offset + len): [first, end).
struct WholeChunks {
  int64_t first;
  int64_t end;
  int64_t count() const { return end > first ? end - first : 0; }
};

WholeChunks whole_chunks(int64_t offset, int64_t len) {
  return {(offset + kChunk - 1) / kChunk, (offset + len) / kChunk};
}

}  // namespace

uint32_t crc32c(const char* data, int64_t len) { return ~update(0xFFFFFFFFu, data, len); }

std::shared_ptr<Checksums::File> Checksums::file(const std::string& path, bool create) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = files_.find(path);
  if (it != files_.end()) return it->second;
  if (!create) return nullptr;
  auto f = std::make_shared<File>();
  files_.emplace(path, f);
  return f;
}

void Checksums::record(const std::string& path, int64_t offset, const char* data, int64_t len) {
  if (len <= 0) return;
  WholeChunks whole = whole_chunks(offset, len);
  std::vector<uint32_t> crcs(whole.count());
  if (!crcs.empty()) chunk_checksums(data + (whole.first * kChunk - offset), whole.count(), crcs.data());
  std::shared_ptr<File> f = file(path, true);
  std::lock_guard<std::mutex> lock(f->mu);
  int64_t last = (offset + len - 1) / kChunk;
  if (static_cast<int64_t>(f->crc.size()) <= last) {
    f->crc.resize(last + 1, 0);
    f->known.resize(last + 1, 0);
  }
  for (int64_t chunk = offset / kChunk; chunk <= last; ++chunk) {
    bool covered = chunk >= whole.first && chunk < whole.end;
    f->known[chunk] = covered;
    if (covered) f->crc[chunk] = crcs[chunk - whole.first];
  }
}

void Checksums::invalidate(const std::string& path, int64_t offset, int64_t len) {
  std::shared_ptr<File> f = file(path, false);
  if (!f || len <= 0) return;
  std::lock_guard<std::mutex> lock(f->mu);
  int64_t last = std::min<int64_t>((offset + len - 1) / kChunk, static_cast<int64_t>(f->known.size()) - 1);
  for (int64_t chunk = offset / kChunk; chunk <= last; ++chunk) f->known[chunk] = 0;
}

void Checksums::forget(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  files_.erase(path);
}

std::optional<ChecksumMismatch> Checksums::verify(const std::string& path, int64_t offset, const char* data,
                                                  int64_t len) const {
  std::shared_ptr<File> f = file(path, false);
  WholeChunks whole = whole_chunks(offset, len);
  if (!f || whole.count() == 0) return std::nullopt;
  std::vector<uint32_t> expected(whole.count());
  std::vector<uint8_t> known(whole.count(), 0);
  bool any = false;
  {
    std::lock_guard<std::mutex> lock(f->mu);
    for (int64_t chunk = whole.first; chunk < whole.end && chunk < static_cast<int64_t>(f->known.size()); ++chunk) {
      known[chunk - whole.first] = f->known[chunk];
      expected[chunk - whole.first] = f->crc[chunk];
      any = any || f->known[chunk];
    }
  }
  if (!any) return std::nullopt;
  std::vector<uint32_t> found(whole.count());
  chunk_checksums(data + (whole.first * kChunk - offset), whole.count(), found.data());
  for (int64_t i = 0; i < whole.count(); ++i) {
    if (known[i] && found[i] != expected[i]) return ChecksumMismatch{(whole.first + i) * kChunk, expected[i], found[i]};
  }
  return std::nullopt;
}

int64_t Checksums::chunks() const {
  std::vector<std::shared_ptr<File>> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& entry : files_) all.push_back(entry.second);
  }
  int64_t total = 0;
  for (const auto& f : all) {
    std::lock_guard<std::mutex> lock(f->mu);
    for (uint8_t k : f->known) total += k;
  }
  return total;
}

}  // namespace fuyou
