#include "core/local_cache.hpp"

namespace pap {

uint32_t LocalCache::class_of(uint64_t block_size) {
  uint32_t fl, sl;
  Allocator::mapping_insert(block_size / kAlign, fl, sl);
  return fl * kSlCount + sl;
}

std::optional<Block> LocalCache::take(uint64_t bytes, uint32_t flags) {
  const uint64_t block_size = Allocator::block_size_for(bytes);
  if (block_size == 0 || block_size > kMaxBlockSize || bytes_ == 0) return std::nullopt;
  if (busy_.test_and_set(std::memory_order_acquire)) return std::nullopt;
  std::optional<Block> found;
  const uint32_t c = class_of(block_size);
  for (uint8_t i = 0; i < count_[c]; ++i) {
    Block& e = entries_[c][i];
    if (e.capacity >= bytes && e.flags == flags) {
      found = e;
      e = entries_[c][--count_[c]];
      bytes_ -= found->capacity + kHeaderSize;
      break;
    }
  }
  busy_.clear(std::memory_order_release);
  return found;
}

bool LocalCache::put(const Block& b) {
  const uint64_t block_size = b.capacity + kHeaderSize;
  if (block_size > kMaxBlockSize || bytes_ + block_size > kMaxBytes) return false;
  if (busy_.test_and_set(std::memory_order_acquire)) return false;
  bool kept = false;
  const uint32_t c = class_of(block_size);
  if (count_[c] < kPerClass) {
    entries_[c][count_[c]++] = b;
    bytes_ += block_size;
    kept = true;
  }
  busy_.clear(std::memory_order_release);
  return kept;
}

}  // namespace pap
