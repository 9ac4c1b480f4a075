// The header in front of every block, and the packed reference to a block.
//
// Shared memory is mapped at a different address in every process, so nothing
// stored in it is a pointer: a block is named by (segment index, byte offset)
// packed into one 64-bit word. Every field has a fixed width so that the
// layout is the same in every process that maps it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace pap {

// Blocks start on 64-byte boundaries: the header is 64 bytes and every block
// size is a multiple of 64, so the payload after the header is 64-aligned
// (a cache line, and enough for any SIMD load).
constexpr uint64_t kAlign = 64;
constexpr uint64_t kHeaderSize = 64;

// Number of process slots. A block does not record which slots hold it,
// only how many do (`holders`); each slot keeps its own list of the blocks
// it holds (hold_list.hpp), so the table can be large.
constexpr uint32_t kMaxSlots = 4096;

// A block reference: segment index in the top 16 bits, byte offset in the low
// 48 bits (offsets are multiples of 64, segments at most 2^48 bytes).
class BlockRef {
 public:
  static constexpr uint64_t kNilBits = ~uint64_t{0};
  static constexpr uint32_t kMaxSegments = 4096;

  constexpr BlockRef() : bits_(kNilBits) {}
  constexpr BlockRef(uint32_t seg, uint64_t off) : bits_((uint64_t{seg} << 48) | off) {}
  static constexpr BlockRef from_bits(uint64_t bits) {
    BlockRef r;
    r.bits_ = bits;
    return r;
  }

  constexpr bool nil() const { return bits_ == kNilBits; }
  constexpr uint32_t seg() const { return static_cast<uint32_t>(bits_ >> 48); }
  constexpr uint64_t off() const { return bits_ & ((uint64_t{1} << 48) - 1); }
  constexpr uint64_t bits() const { return bits_; }
  constexpr bool operator==(const BlockRef& o) const { return bits_ == o.bits_; }
  constexpr bool operator!=(const BlockRef& o) const { return bits_ != o.bits_; }

 private:
  uint64_t bits_;
};

// Block flags (BlockHeader::flags): the low 8 bits are flags; the high 24
// bits hold the pid of the process that made the block's newest pending
// pickle (0 if none or unknown), for diagnostics only. Pids fit: Linux caps
// pid_max at 2^22. It lives here because the 64-byte header has no room
// left.
constexpr uint32_t kFlagTransferRequired = 1;
// The block is a process slot's hold list (hold_list.hpp), not an array.
constexpr uint32_t kFlagHoldList = 2;
// An auto-mode copy (handle.hpp, kHandleFlagPrivate): only a private
// handle loads it, and a private handle loads nothing else, so flipping a
// handle's flag can neither share a receiver's copy nor make a shared
// array look private.
constexpr uint32_t kFlagPrivate = 4;
constexpr uint32_t kFlagBits = 0xff;
constexpr uint32_t kSenderShift = 8;
inline uint32_t with_sender(uint32_t flags, int pid) {
  return (flags & kFlagBits) | (static_cast<uint32_t>(pid) << kSenderShift);
}
inline int sender_of(uint32_t flags) { return static_cast<int>(flags >> kSenderShift); }

// Bits of BlockHeader::size_flags. The size is a multiple of 64, so the low
// six bits are free for flags.
constexpr uint64_t kUsedBit = 1;
constexpr uint64_t kSizeMask = ~(kAlign - 1);

// All fields are read and written only while the pool lock is held, except
// `size_flags`, whose stores are the commit points of allocator operations:
// a process may be killed between any two stores, and recovery walks the
// physical chain of each segment by `size_flags` alone (see allocator.cpp).
// Those stores are release stores so the compiler keeps them after the
// writes they publish.
struct alignas(64) BlockHeader {
  std::atomic<uint64_t> size_flags;  // whole block size incl. header | kUsedBit
  uint64_t prev_size;                // size of the previous block in the segment (0 if first)
  // The fields of a used block; a free block keeps its memory state in some
  // of them instead (FreeState below: which of its pages are returned to
  // the kernel, since when it is free).
  union {
    uint64_t generation;  // unique per allocation; 0 while free
    uint64_t holes_lo;    // free: FreeState::lo
  };
  union {
    struct {
      uint64_t next;  // BlockRef bits of the next free block of the same class
      uint64_t prev;  // BlockRef bits of the previous one
    } free_links;
    struct {
      // How many process slots hold the block (while used). Derived: it
      // equals the number of live slots whose hold list names the block,
      // and repair recounts it from those lists.
      uint32_t holders;
      // For a hold list (kFlagHoldList): the slot that owns it, plus one.
      uint32_t list_owner;
      uint64_t unused_;
    };
  };
  union {
    struct {
      uint32_t pending;  // pickles sent but not loaded yet
      uint32_t flags;    // kFlag* | sender pid (see kSenderShift)
    };
    uint64_t free_seal;  // free: ties holes_lo/hi and free_since_ms to this block
  };
  union {
    uint64_t pending_deadline_ns;  // CLOCK_MONOTONIC time after which `pending` expires
    uint64_t free_since_ms;        // free: FreeState::since_ms
  };
  union {
    uint64_t check;     // header_check(offset, generation, pool key) while used
    uint64_t holes_hi;  // free: FreeState::hi
  };

  uint64_t size() const { return size_flags.load(std::memory_order_relaxed) & kSizeMask; }
  bool used() const { return size_flags.load(std::memory_order_relaxed) & kUsedBit; }
  void commit_size(uint64_t size, bool used) {
    size_flags.store(size | (used ? kUsedBit : 0), std::memory_order_release);
  }
  unsigned char* payload() { return reinterpret_cast<unsigned char*>(this) + kHeaderSize; }
  uint64_t capacity() const { return size() - kHeaderSize; }
};

static_assert(sizeof(BlockHeader) == kHeaderSize, "block header must be exactly 64 bytes");
// Shared by every process of a pool: a change must bump the pool's layout
// version and redraw docs/images/segment_layout.png (make diagrams).
static_assert(offsetof(BlockHeader, prev_size) == 8 && offsetof(BlockHeader, generation) == 16);
static_assert(offsetof(BlockHeader, holders) == 24 && offsetof(BlockHeader, pending) == 40);
static_assert(offsetof(BlockHeader, flags) == 44 &&
              offsetof(BlockHeader, pending_deadline_ns) == 48);
static_assert(offsetof(BlockHeader, check) == 56 && offsetof(BlockHeader, holes_lo) == 16);
static_assert(offsetof(BlockHeader, free_seal) == 40 && offsetof(BlockHeader, free_since_ms) == 48);
static_assert(offsetof(BlockHeader, holes_hi) == 56);
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared atomics must be lock-free");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "shared atomics must be lock-free");

// Pages: the unit in which /dev/shm reserves memory and gives it back.
constexpr uint64_t kPageSize = 4096;

// What a free block knows of its memory. Pages of a segment are reserved
// (posix_fallocate) lazily, just before a block first covers them, and the
// pages of a block that stays free for a while are given back (a hole
// punched in the file). A free block records one range of its pages,
// [lo, hi) (absolute segment offsets, whole pages, inside the block's
// interior: never the page of its own header nor of the next block's),
// that may be returned: every page of the block outside it is reserved.
// lo == hi: none. `since_ms`: when the block's reserved pages last started
// being free (coarse CLOCK_MONOTONIC milliseconds). The record is sealed
// with a hash of (block, size, lo, hi, since): one that does not check out
// (a process killed between a block's commit and its record) is read as
// "every interior page may be returned", which is always safe: an
// allocation reserves those pages again, at worst for nothing.
// `mixed`: the range may also hold reserved pages (two ranges merged across
// reserved pages between them, or a record that did not check out): the
// whole range is punched when the block is given back, which makes the
// record exact again.
struct FreeState {
  uint64_t lo = 0;
  uint64_t hi = 0;
  uint64_t since_ms = 0;
  bool mixed = false;
  bool any_holes() const { return lo < hi; }
};
// FreeState::mixed is kept in the top bit of free_since_ms.
constexpr uint64_t kMixedBit = uint64_t{1} << 63;

// A block this process holds, as the binding sees it.
struct Block {
  BlockRef ref;
  uint64_t generation;
  unsigned char* payload;
  uint64_t capacity;
  uint32_t flags;
};

// A used block's `check` ties its generation to its own offset, so that a
// stale handle pointing at bytes that are now the middle of another block's
// payload is refused unless those bytes spell this exact value. It is keyed
// with the pool's random secret (ControlHeader::check_key, in the mode-0600
// control segment): unkeyed, anyone who can choose an array's contents
// (data from the network, say) could write a header that passes for a
// block of any size at a stale handle's offset and so reach the arrays
// after it. Without the key the 64-bit value cannot be predicted. This is
// not a MAC against someone who reads headers (same-user processes, which
// are trusted), only against someone who writes payload bytes blind.
inline uint64_t header_check(uint64_t off, uint64_t generation, uint64_t key) {
  uint64_t x = key ^ (off * 0x9E3779B97F4A7C15ull);
  x ^= generation * 0xBF58476D1CE4E5B9ull;
  // Two rounds of a 64-bit finalizer (murmur3's fmix64): every input bit
  // reaches every output bit.
  for (int i = 0; i < 2; ++i) {
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDull;
    x ^= x >> 33;
    x *= 0xC4CEB9FE1A85EC53ull;
    x ^= x >> 33;
  }
  return x;
}

}  // namespace pap
