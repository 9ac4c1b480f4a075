// Handle tests: the byte format and its round trip, malformed handles
// refused (with a fuzz loop), and the byte extent of a view.

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <random>
#include <string>

#include "core/errors.hpp"
#include "core/handle.hpp"
#include "core/shm_segment.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kHandle;

Handle random_handle(std::mt19937_64& rng) {
  Handle h;
  for (auto& b : h.pool.bytes) b = static_cast<uint8_t>(rng());
  for (auto& b : h.instance.bytes) b = static_cast<uint8_t>(rng());
  h.ref = BlockRef(static_cast<uint32_t>(rng() % BlockRef::kMaxSegments),
                   (rng() % (uint64_t{1} << 42)) * kAlign);
  h.generation = std::max<uint64_t>(rng(), 1);
  h.flags = static_cast<uint8_t>(rng() % (kHandleFlags + 1));
  if (h.flags & kHandleFlagPrivate) h.flags |= kHandleFlagTransferRequired;  // always together
  h.ndim = static_cast<uint32_t>(rng() % (kMaxDims + 1));
  h.itemsize = 1 + rng() % 16;
  int64_t neg = 0;
  for (uint32_t i = 0; i < h.ndim; ++i) {
    // Valid means numpy could build it: the element count times the item
    // size fits in 63 bits (4^16 * 16 does), so only 16 dimensions vary.
    h.shape[i] = rng() % 25 == 0 ? 0 : 1 + static_cast<int64_t>(i < 16 ? rng() % 4 : 0);
    h.strides[i] = static_cast<int64_t>(rng() % 2001) - 1000;
    if (h.strides[i] < 0 && h.shape[i] > 0) neg += (h.shape[i] - 1) * h.strides[i];
  }
  h.view_offset = static_cast<uint64_t>(-neg) + rng() % 4096;
  return h;
}

bool same_handle(const Handle& a, const Handle& b) {
  if (!(a.pool == b.pool) || !(a.instance == b.instance) || a.ref != b.ref ||
      a.generation != b.generation || a.flags != b.flags || a.view_offset != b.view_offset ||
      a.itemsize != b.itemsize || a.ndim != b.ndim)
    return false;
  for (uint32_t i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i] || a.strides[i] != b.strides[i]) return false;
  return true;
}

void poke64(std::string& s, size_t at, uint64_t v) {
  for (int i = 0; i < 8; ++i) s[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

// 5. Handle encoding.
TEST(handle_round_trip) {
  std::mt19937_64 rng(6);
  for (int i = 0; i < 20000; ++i) {
    Handle h = random_handle(rng);
    std::string bytes = encode_handle(h);
    CHECK_EQ(bytes.size(), kHandleFixedBytes + 16 * h.ndim);
    Handle d;
    try {
      d = decode(bytes);
    } catch (const std::exception& e) {
      record_failure(__FILE__, __LINE__, std::string("a valid handle was refused: ") + e.what());
      continue;
    }
    CHECK(same_handle(h, d));
    CHECK(encode_handle(d) == bytes);
  }
  // Layout as documented in handle.hpp.
  Handle h;
  h.pool = PoolId::from_token("000102030405060708090a0b0c0d0e0f");
  h.instance = PoolId::from_token("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf");
  h.ref = BlockRef(3, 128);
  h.generation = 0x1122334455667788ull;
  h.flags = kHandleFlagTransferRequired | kHandleFlagReadOnly;
  h.view_offset = 8;
  h.itemsize = 4;
  h.ndim = 1;
  h.shape[0] = 2;
  h.strides[0] = -4;
  std::string b = encode_handle(h);
  REQUIRE(b.size() == 96);
  CHECK(b.compare(0, 4, "PAPH") == 0);
  CHECK(b[4] == 2 && b[5] == 3 && b[6] == 1 && b[7] == 0);
  for (int i = 0; i < 16; ++i) CHECK_EQ(static_cast<int>(b[8 + i]), i);
  for (int i = 0; i < 16; ++i) CHECK_EQ(static_cast<unsigned char>(b[64 + i]), 0xa0u + i);
  CHECK_EQ(static_cast<unsigned char>(b[24]), 128u);
  CHECK_EQ(static_cast<unsigned char>(b[30]), 3u);  // segment in bits 48..63
  CHECK_EQ(static_cast<unsigned char>(b[32]), 0x88u);
  CHECK_EQ(static_cast<unsigned char>(b[39]), 0x11u);
  CHECK_EQ(static_cast<unsigned char>(b[80]), 2u);     // shape
  CHECK_EQ(static_cast<unsigned char>(b[88]), 0xFCu);  // stride -4, little-endian
}

TEST(handle_rejects_malformed) {
  Handle base;
  base.pool = PoolId::from_token(random_token());
  base.instance = PoolId::from_token(random_token());
  base.ref = BlockRef(1, 128);
  base.generation = 5;
  base.flags = kHandleFlagTransferRequired;
  base.itemsize = 8;
  base.ndim = 2;
  base.shape[0] = 3;
  base.shape[1] = 4;
  base.strides[0] = 32;
  base.strides[1] = 8;
  const std::string good = encode_handle(base);
  CHECK_NOTHROW(decode(good));
  auto with = [&](const std::function<void(std::string&)>& edit) {
    std::string s = good;
    edit(s);
    return s;
  };
  const ErrorKind bad = ErrorKind::kInvalidHandle;
  CHECK_THROWS(bad, decode(""));
  CHECK_THROWS(bad, decode(good.substr(0, 63)));
  CHECK_THROWS(bad, decode(good.substr(0, 79)));  // a format 1 fixed part
  CHECK_THROWS(bad, decode(good.substr(0, good.size() - 1)));
  CHECK_THROWS(bad, decode(good.substr(0, good.size() - 16)));
  CHECK_THROWS(bad, decode(good + '\0'));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[0] = 'X'; })));
  // A private handle always tracks its transfer (its pending count is what
  // makes it load once).
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[5] = kHandleFlagPrivate; })));
  CHECK_NOTHROW(decode(
      with([](std::string& s) { s[5] = kHandleFlagPrivate | kHandleFlagTransferRequired; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[3] = 'h'; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[4] = 0; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[4] = 1; })));  // format 1: no instance
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[4] = 3; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[6] = 3; })));  // length for ndim 2
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[6] = 1; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[7] = 1; })));  // reserved
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[60] = 1; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[5] = 8; })));  // unknown flags
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[5] = 15; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[5] = '\x81'; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 32, 0); })));  // generation 0
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 24, ~uint64_t{0}); })));  // nil
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 24, (uint64_t{1} << 48) | 65); })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 24, uint64_t{4096} << 48); })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 48, (uint64_t{1} << 40) + 1); })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 80, ~uint64_t{0}); })));  // -1
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 88, uint64_t{1} << 63); })));
  // 65 dimensions with the length that would match them.
  {
    std::string s = good.substr(0, kHandleFixedBytes);
    s[6] = 65;
    s.append(16 * 65, '\0');
    CHECK_THROWS(bad, decode(s));
    s[6] = static_cast<char>(255);
    s.append(16 * (255 - 65), '\0');
    CHECK_THROWS(bad, decode(s));
  }
  // The byte extent overflows, or reaches below the block.
  {
    Handle h = base;
    h.shape[0] = int64_t{1} << 62;
    h.strides[0] = int64_t{1} << 40;
    CHECK_THROWS(bad, decode(encode_handle(h)));
    h = base;
    h.shape[0] = INT64_MAX;
    h.strides[0] = INT64_MIN;
    CHECK_THROWS(bad, decode(encode_handle(h)));
    h = base;
    h.strides[0] = -32;  // view_offset 0: the first row would start at -64
    CHECK_THROWS(bad, decode(encode_handle(h)));
    h.view_offset = 64;
    CHECK_NOTHROW(decode(encode_handle(h)));
    h = base;
    h.view_offset = uint64_t{1} << 62;
    CHECK_THROWS(bad, decode(encode_handle(h)));
    h.shape[1] = 0;  // empty, but its offset is still out of range
    h.view_offset = (uint64_t{1} << 62) + 1;
    CHECK_THROWS(bad, decode(encode_handle(h)));
  }
  // Every rejection is kInvalidHandle, never another kind or a crash.
  std::mt19937_64 rng(7);
  const std::string prefix = good.substr(0, 8);
  uint64_t decoded = 0, refused = 0;
  for (int i = 0; i < 100000; ++i) {
    std::string s;
    switch (rng() % 4) {
      case 0: {  // random bytes
        s.resize(rng() % (kHandleFixedBytes + 16 * 70));
        for (char& c : s) c = static_cast<char>(rng());
        break;
      }
      case 1: {  // a plausible header, random body
        uint32_t ndim = static_cast<uint32_t>(rng() % 70);
        s.resize(kHandleFixedBytes + 16 * ndim + (rng() % 8 == 0 ? rng() % 3 : 0));
        for (char& c : s) c = static_cast<char>(rng() % 3 ? 0 : rng());
        std::memcpy(s.data(), prefix.data(), std::min<size_t>(8, s.size()));
        if (s.size() > 6) s[6] = static_cast<char>(ndim);
        if (s.size() > 5) s[5] = static_cast<char>(rng() % 3);
        if (s.size() > 32 && rng() % 2) s[32] = 1;
        break;
      }
      case 2: {  // a valid handle with a few bytes or bits changed
        s = encode_handle(random_handle(rng));
        for (int k = 1 + static_cast<int>(rng() % 4); k > 0; --k) {
          size_t at = rng() % s.size();
          if (rng() % 2)
            s[at] = static_cast<char>(rng());
          else
            s[at] = static_cast<char>(s[at] ^ (1 << (rng() % 8)));
        }
        break;
      }
      default: {  // a valid handle cut short or extended
        s = encode_handle(random_handle(rng));
        if (rng() % 2)
          s.resize(rng() % s.size());
        else
          s.append(1 + rng() % 32, static_cast<char>(rng()));
        break;
      }
    }
    try {
      Handle h = decode(s);
      ++decoded;
      CHECK(encode_handle(h) == s);
      uint64_t lo, hi;
      CHECK(view_extent(h, &lo, &hi) && lo <= hi);
    } catch (const CoreError& e) {
      ++refused;
      if (e.kind() != ErrorKind::kInvalidHandle)
        record_failure(__FILE__, __LINE__, std::string("fuzz: wrong kind: ") + e.what());
    } catch (const std::exception& e) {
      record_failure(__FILE__, __LINE__, std::string("fuzz: unexpected exception: ") + e.what());
    }
  }
  CHECK(decoded > 5000);
  CHECK(refused > 50000);
}

TEST(handle_view_extent) {
  Handle h;
  uint64_t lo = 1, hi = 1;
  // ndim 0: one item.
  h.view_offset = 64;
  h.itemsize = 8;
  CHECK(view_extent(h, &lo, &hi) && lo == 64 && hi == 72);
  // Contiguous 1-d.
  h.ndim = 1;
  h.shape[0] = 10;
  h.strides[0] = 8;
  h.view_offset = 0;
  CHECK(view_extent(h, &lo, &hi) && lo == 0 && hi == 80);
  // Negative stride: elements at 100, 92, 84.
  h.view_offset = 100;
  h.shape[0] = 3;
  h.strides[0] = -8;
  CHECK(view_extent(h, &lo, &hi) && lo == 84 && hi == 108);
  // Mixed signs in 2-d: rows at 64, 32, 0; columns +0..+24.
  h.ndim = 2;
  h.view_offset = 64;
  h.shape[0] = 3;
  h.strides[0] = -32;
  h.shape[1] = 4;
  h.strides[1] = 8;
  CHECK(view_extent(h, &lo, &hi) && lo == 0 && hi == 96);
  // Broadcast (stride 0): one item whatever the shape.
  h.ndim = 1;
  h.view_offset = 16;
  h.shape[0] = 1000;
  h.strides[0] = 0;
  CHECK(view_extent(h, &lo, &hi) && lo == 16 && hi == 24);
  // Empty shapes touch nothing, whatever the strides.
  h.ndim = 2;
  h.view_offset = 40;
  h.shape[0] = 0;
  h.strides[0] = -1000;
  h.shape[1] = 5;
  h.strides[1] = 1 << 20;
  CHECK(view_extent(h, &lo, &hi) && lo == 40 && hi == 40);
  h.shape[0] = 5;
  h.shape[1] = 0;
  CHECK(view_extent(h, &lo, &hi) && lo == 40 && hi == 40);
  // Below zero, and overflow.
  h.ndim = 1;
  h.view_offset = 8;
  h.shape[0] = 3;
  h.strides[0] = -8;
  CHECK(!view_extent(h, &lo, &hi));
  h.view_offset = 0;
  h.shape[0] = INT64_MAX;
  h.strides[0] = INT64_MAX;
  CHECK(!view_extent(h, &lo, &hi));
  h.strides[0] = INT64_MIN;
  CHECK(!view_extent(h, &lo, &hi));
  h.ndim = kMaxDims;
  for (uint32_t i = 0; i < kMaxDims; ++i) {
    h.shape[i] = int64_t{1} << 40;
    h.strides[i] = int64_t{1} << 22;
  }
  CHECK(!view_extent(h, &lo, &hi));  // each term is fine, the sum is not
}

}  // namespace
}  // namespace pap::test
