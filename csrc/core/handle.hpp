// The handle: what a pickle of a pool array carries instead of its bytes.
//
// Layout (little-endian, fixed widths, 80 + 16 * ndim bytes):
//   0  magic "PAPH"      4  format version (u8) = 2, flags (u8), ndim (u8), 0
//   8  pool id (16 bytes: the token)
//  24  block ref (u64: segment << 48 | offset)
//  32  generation (u64)
//  40  view byte offset from the block payload (u64)
//  48  itemsize (u64)
//  56  reserved (u64) = 0
//  64  pool instance id (16 bytes, new in version 2)
//  80  shape (i64 x ndim), then strides (i64 x ndim)
// Flags: transfer required (1), read-only view (2), private copy (4).
// The dtype travels beside the handle as an ordinary pickled numpy dtype.
// decode() checks every field it can without the pool; the pool then checks
// the pool id and instance, the block (generation, header check) and that
// the view's byte extent lies inside the block before any array is built on
// it.
//
// Why the instance: a token outlives its pool (a name the user fixed, a
// Dask cluster's name, a pool without a root that ends and is made again).
// A new pool under the old token hands out the same blocks with the same
// generations, so without the instance an old handle would load another
// array's bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/block_header.hpp"

namespace pap {

constexpr uint32_t kMaxDims = 64;
constexpr uint8_t kHandleFlagTransferRequired = 1;
// The view was not writeable when it was pickled: it loads read-only, so a
// receiver cannot write through an array its sender gave out read-only.
constexpr uint8_t kHandleFlagReadOnly = 2;
// Auto mode (pyarraypool/_auto.py) sent a copy of a plain ndarray: the
// handle loads once, into a plain ndarray that is the receiver's alone.
// Always with kHandleFlagTransferRequired: its one pending count is the
// "not loaded yet" that the load consumes.
constexpr uint8_t kHandleFlagPrivate = 4;
constexpr uint8_t kHandleFlags =
    kHandleFlagTransferRequired | kHandleFlagReadOnly | kHandleFlagPrivate;

// 16 bytes naming a pool: its token (Pool::id()), or its instance
// (Pool::instance(), the control header's random instance id).
struct PoolId {
  uint8_t bytes[16];
  bool operator==(const PoolId& o) const;
  static PoolId from_token(const std::string& hex_token);
};

struct Handle {
  PoolId pool;
  PoolId instance;
  BlockRef ref;
  uint64_t generation = 0;
  uint8_t flags = 0;
  uint64_t view_offset = 0;
  uint64_t itemsize = 0;
  uint32_t ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
};

constexpr size_t kHandleFixedBytes = 80;

std::string encode_handle(const Handle& h);
// The same bytes written to `out`, which has room for encoded_size(h).
size_t encoded_size(const Handle& h);
void encode_handle_into(const Handle& h, unsigned char* out);
// Throws CoreError(kInvalidHandle) with a reason for any malformed input.
Handle decode_handle(const void* data, size_t len);

// The bytes of the block a view touches, relative to the payload start:
// [lo, hi). An empty view touches nothing (lo == hi == view_offset).
// Returns false if the arithmetic overflows or goes below 0.
bool view_extent(const Handle& h, uint64_t* lo, uint64_t* hi);

}  // namespace pap
