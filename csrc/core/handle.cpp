#include "core/handle.hpp"

#include <cstring>

#include "core/errors.hpp"

namespace pap {
namespace {

constexpr char kMagic[4] = {'P', 'A', 'P', 'H'};
// 2: the pool instance id at 64, the read-only flag.
constexpr uint8_t kVersion = 2;

uint64_t get64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
[[noreturn]] void invalid(const std::string& why) {
  throw CoreError(ErrorKind::kInvalidHandle, "invalid pyarraypool handle: " + why);
}

}  // namespace

bool PoolId::operator==(const PoolId& o) const { return std::memcmp(bytes, o.bytes, 16) == 0; }

PoolId PoolId::from_token(const std::string& hex) {
  PoolId id{};
  auto nibble = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
  for (size_t i = 0; i < 16 && 2 * i + 1 < hex.size(); ++i)
    id.bytes[i] = static_cast<uint8_t>(nibble(hex[2 * i]) << 4 | nibble(hex[2 * i + 1]));
  return id;
}

size_t encoded_size(const Handle& h) { return kHandleFixedBytes + 16 * size_t{h.ndim}; }

void encode_handle_into(const Handle& h, unsigned char* out) {
  auto put = [&out](uint64_t v) {
    for (int i = 0; i < 8; ++i) *out++ = static_cast<unsigned char>((v >> (8 * i)) & 0xff);
  };
  std::memcpy(out, kMagic, 4);
  out[4] = kVersion;
  out[5] = h.flags;
  out[6] = static_cast<unsigned char>(h.ndim);
  out[7] = 0;
  std::memcpy(out + 8, h.pool.bytes, 16);
  out += 24;
  put(h.ref.bits());
  put(h.generation);
  put(h.view_offset);
  put(h.itemsize);
  put(0);
  std::memcpy(out, h.instance.bytes, 16);
  out += 16;
  for (uint32_t i = 0; i < h.ndim; ++i) put(static_cast<uint64_t>(h.shape[i]));
  for (uint32_t i = 0; i < h.ndim; ++i) put(static_cast<uint64_t>(h.strides[i]));
}

std::string encode_handle(const Handle& h) {
  std::string out(encoded_size(h), '\0');
  encode_handle_into(h, reinterpret_cast<unsigned char*>(out.data()));
  return out;
}

Handle decode_handle(const void* data, size_t len) {
  const auto* p = static_cast<const unsigned char*>(data);
  if (len < kHandleFixedBytes) invalid("too short (" + std::to_string(len) + " bytes)");
  if (std::memcmp(p, kMagic, 4) != 0) invalid("bad magic");
  if (p[4] != kVersion) invalid("unsupported format version " + std::to_string(p[4]));
  Handle h;
  h.flags = p[5];
  h.ndim = p[6];
  if (p[7] != 0 || get64(p + 56) != 0) invalid("reserved bytes are not zero");
  if (h.flags & ~kHandleFlags) invalid("unknown flags");
  if ((h.flags & kHandleFlagPrivate) && !(h.flags & kHandleFlagTransferRequired))
    invalid("a private handle without transfer tracking");
  if (h.ndim > kMaxDims) invalid("too many dimensions");
  if (len != kHandleFixedBytes + 16 * size_t{h.ndim})
    invalid("length " + std::to_string(len) + " does not match ndim " + std::to_string(h.ndim));
  std::memcpy(h.pool.bytes, p + 8, 16);
  std::memcpy(h.instance.bytes, p + 64, 16);
  h.ref = BlockRef::from_bits(get64(p + 24));
  h.generation = get64(p + 32);
  h.view_offset = get64(p + 40);
  h.itemsize = get64(p + 48);
  if (h.ref.nil() || h.ref.off() % kAlign != 0) invalid("bad block reference");
  if (h.ref.seg() >= BlockRef::kMaxSegments) invalid("segment index out of range");
  if (h.generation == 0) invalid("generation 0");
  if (h.itemsize > (uint64_t{1} << 40)) invalid("item size out of range");
  for (uint32_t i = 0; i < h.ndim; ++i) {
    h.shape[i] = static_cast<int64_t>(get64(p + kHandleFixedBytes + 8 * i));
    h.strides[i] = static_cast<int64_t>(get64(p + kHandleFixedBytes + 8 * (h.ndim + i)));
    if (h.shape[i] < 0) invalid("negative dimension");
  }
  uint64_t lo, hi;
  if (!view_extent(h, &lo, &hi)) invalid("view extent overflows");
  // numpy refuses arrays whose nominal size overflows, even empty ones or
  // ones with zero strides: refuse them here, as malformed.
  uint64_t nbytes = h.itemsize;
  for (uint32_t i = 0; i < h.ndim; ++i)
    if (h.shape[i] != 0 &&
        __builtin_mul_overflow(nbytes, static_cast<uint64_t>(h.shape[i]), &nbytes))
      invalid("array size overflows");
  if (nbytes > static_cast<uint64_t>(INT64_MAX)) invalid("array size overflows");
  return h;
}

bool view_extent(const Handle& h, uint64_t* lo, uint64_t* hi) {
  // Work in signed 128-bit arithmetic: shape * stride of hostile inputs
  // overflows 64 bits.
  __int128 low = static_cast<__int128>(h.view_offset), high = low;
  bool empty = false;
  for (uint32_t i = 0; i < h.ndim; ++i) {
    if (h.shape[i] == 0) empty = true;
    // Each term is below 2^126 and there are at most 64 of them: bound
    // every term to keep the sum inside 128 bits.
    __int128 span = static_cast<__int128>(h.shape[i] - 1) * h.strides[i];
    if (span > (static_cast<__int128>(1) << 100) || span < -(static_cast<__int128>(1) << 100))
      return false;
    if (span < 0)
      low += span;
    else
      high += span;
  }
  const __int128 limit = static_cast<__int128>(1) << 62;
  if (empty) {
    if (h.view_offset > static_cast<uint64_t>(limit)) return false;
    *lo = *hi = h.view_offset;
    return true;
  }
  high += h.itemsize;
  if (low < 0 || high > limit) return false;
  *lo = static_cast<uint64_t>(low);
  *hi = static_cast<uint64_t>(high);
  return true;
}

}  // namespace pap
