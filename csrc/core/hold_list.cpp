#include "core/hold_list.hpp"

namespace pap {

void HoldIndex::insert(uint64_t key, HoldRef value) {
  // At most half full: probes stay short.
  if (2 * (size_ + 1) > mask_ + 1 || !keys_) grow();
  uint64_t i = home(key);
  while (keys_[i] != kEmpty) i = (i + 1) & mask_;
  keys_[i] = key;
  values_[i] = value;
  ++size_;
}

bool HoldIndex::take(uint64_t key, HoldRef* out) {
  if (size_ == 0) return false;
  uint64_t i = home(key);
  while (keys_[i] != key) {
    if (keys_[i] == kEmpty) return false;
    i = (i + 1) & mask_;
  }
  if (out) *out = values_[i];
  // Backward shift: move up each later entry of the run whose home is not
  // between the hole and it, so that every key stays reachable from home.
  for (uint64_t j = (i + 1) & mask_; keys_[j] != kEmpty; j = (j + 1) & mask_) {
    const uint64_t h = home(keys_[j]);
    const bool stays = i <= j ? (i < h && h <= j) : (i < h || h <= j);
    if (stays) continue;
    keys_[i] = keys_[j];
    values_[i] = values_[j];
    i = j;
  }
  keys_[i] = kEmpty;
  --size_;
  return true;
}

void HoldIndex::clear() {
  for (uint64_t i = 0; keys_ && i <= mask_; ++i) keys_[i] = kEmpty;
  size_ = 0;
}

void HoldIndex::grow() {
  const uint64_t old_cap = keys_ ? mask_ + 1 : 0;
  const uint64_t cap = old_cap ? old_cap * 2 : 64;
  std::unique_ptr<uint64_t[]> old_keys = std::move(keys_);
  std::unique_ptr<HoldRef[]> old_values = std::move(values_);
  keys_.reset(new uint64_t[cap]);
  values_.reset(new HoldRef[cap]);
  for (uint64_t i = 0; i < cap; ++i) keys_[i] = kEmpty;
  mask_ = cap - 1;
  shift_ = 64 - __builtin_ctzll(cap);
  size_ = 0;
  for (uint64_t i = 0; i < old_cap; ++i)
    if (old_keys[i] != kEmpty) insert(old_keys[i], old_values[i]);
}

}  // namespace pap
