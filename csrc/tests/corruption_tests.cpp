// Tampered shared memory: free-list links, bitmaps, block sizes, the
// segment table, and segment files that are not the pool's own. Whatever
// is written there, the core raises CoreError(kPool) and never reads or
// writes outside a segment, never loops forever.
//
// Each case runs in a forked child (a wild write or an endless walk must
// fail the case, not end the whole program): the child exits 0 when the
// operation threw kPool, and 2, 3 or 4 otherwise; a crash shows as a signal
// (128 + n) and a loop as SIGALRM.

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "allocator_arena.hpp"
#include "core/allocator.hpp"
#include "core/block_header.hpp"
#include "core/errors.hpp"
#include "core/pool.hpp"
#include "core/pool_internal.hpp"
#include "core/shm_segment.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kCorruption;

// Runs `op` in a child; its exit status: 0 if it threw CoreError(kPool).
int child_status(const std::function<void()>& op) {
  const pid_t pid = fork_child(
      [&]() -> int {
        try {
          op();
        } catch (const CoreError& e) {
          if (e.kind() == ErrorKind::kPool) return 0;
          std::fprintf(stderr, "  child: CoreError of kind %d: %s\n", static_cast<int>(e.kind()),
                       e.what());
          return 2;
        } catch (const std::exception& e) {
          std::fprintf(stderr, "  child: %s\n", e.what());
          return 3;
        }
        std::fprintf(stderr, "  child: no error\n");
        return 4;
      },
      ChildOptions{10, true, "corruption child"});
  REQUIRE(pid >= 0);
  return wait_child(pid);
}

#define CHECK_CORRUPT(...) CHECK_EQ(child_status([&] { __VA_ARGS__; }), 0)

// 64 units of 64 bytes: its class also holds 65-unit blocks, so a request
// of kBlock + kAlign searches this class's own list.
constexpr uint64_t kBlock = 4096;

// One 1 MiB segment: used A, free B, used C, free D, used E, then the rest
// free. B and D are of one size class: D heads its list, then B.
struct Layout {
  Arena ar{{1u << 20}};
  BlockRef a, b, c, d, e;
  Layout() {
    Allocator al = ar.alloc();
    BlockRef* refs[] = {&a, &b, &c, &d, &e};
    uint64_t gen = 1;
    for (BlockRef* r : refs) *r = al.allocate(kBlock, UsedInit{gen++, 0, 0});
    al.free(b);
    al.free(d);
  }
  BlockHeader* h(BlockRef r) { return ar.alloc().header(r); }
  uint64_t& head_of_class() {
    uint32_t fl, sl;
    Allocator::mapping_insert(kBlock / kAlign, fl, sl);
    return ar.state().heads[fl][sl];
  }
  BlockRef take() { return ar.alloc().allocate(kBlock, UsedInit{99, 0, 0}); }
  // The bitmaps name B and D's class only (as if the rest of the segment
  // were used): largest_free() and the search of a class's own list walk it.
  void only_their_class() {
    uint32_t fl, sl;
    Allocator::mapping_insert(kBlock / kAlign, fl, sl);
    for (auto& w : ar.state().sl_bitmap) w = 0;
    ar.state().sl_bitmap[fl] = 1u << sl;
    ar.state().fl_bitmap = uint64_t{1} << fl;
  }
};

TEST(corrupt_layout_is_sound_untouched) {
  Layout l;
  CHECK_VERIFY(l.ar);
  CHECK_EQ(l.head_of_class(), l.d.bits());
  CHECK_EQ(l.h(l.d)->free_links.next, l.b.bits());
  CHECK_EQ(child_status([&] { l.take(), l.take(), l.ar.alloc().largest_free(); }), 4);
}

TEST(corrupt_next_link_to_a_segment_that_does_not_exist) {
  Layout l;
  l.h(l.d)->free_links.next = BlockRef(7, 0).bits();
  CHECK_CORRUPT(l.take());
}

TEST(corrupt_next_link_past_the_segment_end) {
  Layout l;
  l.h(l.d)->free_links.next = BlockRef(0, uint64_t{1} << 40).bits();
  CHECK_CORRUPT(l.take());
}

TEST(corrupt_next_link_misaligned) {
  Layout l;
  l.h(l.d)->free_links.next = BlockRef(0, l.b.off() + 8).bits();
  CHECK_CORRUPT(l.take());
}

TEST(corrupt_next_link_into_a_payload) {
  Layout l;
  l.h(l.d)->free_links.next = BlockRef(0, l.a.off() + 2 * kAlign).bits();
  CHECK_CORRUPT(l.take());
}

TEST(corrupt_prev_link_out_of_range) {
  Layout l;
  l.h(l.b)->free_links.prev = BlockRef(3, 64).bits();
  CHECK_CORRUPT(l.take(), l.take());  // takes D, then B: B's prev is bad
}

TEST(corrupt_head_points_at_a_used_block) {
  Layout l;
  l.head_of_class() = l.c.bits();
  CHECK_CORRUPT(l.take());
}

TEST(corrupt_head_out_of_range) {
  Layout l;
  l.head_of_class() = BlockRef(0, (1u << 20) + 4096).bits();
  CHECK_CORRUPT(l.take());
}

TEST(corrupt_bitmap_names_an_empty_list) {
  Layout l;
  l.head_of_class() = BlockRef::kNilBits;  // the bitmaps still say it has blocks
  CHECK_CORRUPT(l.take());
}

TEST(corrupt_first_level_bitmap_past_the_classes) {
  Layout l;
  l.ar.state().fl_bitmap = uint64_t{1} << 50;
  l.ar.state().sl_bitmap[20] = 0;
  CHECK_CORRUPT(l.ar.alloc().allocate(uint64_t{1} << 21, UsedInit{5, 0, 0}));
  CHECK_CORRUPT(l.ar.alloc().largest_free());
}

TEST(corrupt_free_list_cycle_through_next_only) {
  Layout l;
  l.h(l.b)->free_links.next = l.d.bits();  // D -> B -> D ..., D's prev still nil
  l.only_their_class();
  CHECK_CORRUPT(l.ar.alloc().largest_free());
  CHECK_CORRUPT(l.ar.alloc().verify(1));
}

TEST(corrupt_free_list_cycle_with_consistent_back_links) {
  Layout l;
  // D <-> B both ways, and nothing else: every link agrees with its
  // neighbour, only the walk's length gives it away.
  l.h(l.b)->free_links.next = l.d.bits();
  l.h(l.d)->free_links.prev = l.b.bits();
  l.only_their_class();
  CHECK_CORRUPT(l.ar.alloc().largest_free());
  CHECK_CORRUPT(l.ar.alloc().verify(1));
  // The class's own list is searched when no larger class has a block.
  CHECK_CORRUPT(l.ar.alloc().allocate(kBlock + kAlign, UsedInit{5, 0, 0}));
}

TEST(corrupt_size_of_a_free_neighbour) {
  Layout l;
  l.h(l.d)->commit_size(uint64_t{1} << 46, false);  // D, after C, claims 64 TiB
  CHECK_CORRUPT(l.ar.alloc().free(l.c));
}

TEST(corrupt_prev_size_before_the_segment) {
  Layout l;
  l.h(l.c)->prev_size = l.c.off() + kAlign;
  CHECK_CORRUPT(l.ar.alloc().free(l.c));
}

TEST(corrupt_prev_size_misaligned_or_disagreeing) {
  Layout l;
  l.h(l.c)->prev_size = kBlock - 8;
  CHECK_CORRUPT(l.ar.alloc().free(l.c));
  Layout m;
  m.h(m.c)->prev_size = 2 * kBlock;  // lands on A's header: A is not C's neighbour
  CHECK_CORRUPT(m.ar.alloc().free(m.c));
}

TEST(corrupt_block_size_in_a_chain_walk) {
  Layout l;
  l.h(l.c)->commit_size(0, true);
  CHECK_CORRUPT(l.ar.alloc().rebuild(1, [](BlockRef, BlockHeader&) { return true; }));
  Layout m;
  m.h(m.c)->commit_size(uint64_t{1} << 47, true);
  CHECK_CORRUPT(m.ar.alloc().rebuild(1, [](BlockRef, BlockHeader&) { return true; }));
  CHECK_CORRUPT(m.ar.alloc().verify(1));
}

// ------------------------------------------------------------ through a pool

// The control segment of `token`, mapped as any process of its user can.
class ControlMap {
 public:
  explicit ControlMap(const std::string& token) {
    const int fd = ::shm_open(control_name(token).c_str(), O_RDWR, 0);
    if (fd < 0) throw std::runtime_error("cannot open the control segment");
    p_ = ::mmap(nullptr, kControlBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p_ == MAP_FAILED) throw std::runtime_error("cannot map the control segment");
  }
  ~ControlMap() { ::munmap(p_, kControlBytes); }
  ControlMap(const ControlMap&) = delete;
  ControlMap& operator=(const ControlMap&) = delete;
  ControlHeader* operator->() { return static_cast<ControlHeader*>(p_); }

 private:
  void* p_;
};

// A fresh pool with one block of `bytes` in its one segment; the block's
// header, and the control segment mapped as the same user can.
struct OnePool {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 1u << 20);
  Attached p{tok, cfg};
  std::optional<Block> block;
  std::unique_ptr<ControlMap> control;
  explicit OnePool(uint64_t bytes) : block(p->allocate(bytes, false, Mode::kSlow)) {
    if (!block) throw std::runtime_error("cannot allocate");
    control = std::make_unique<ControlMap>(tok);
  }
  ControlMap& m() { return *control; }
  BlockHeader* header() { return reinterpret_cast<BlockHeader*>(block->payload - kHeaderSize); }
};

TEST(corrupt_segment_count_past_the_table) {
  OnePool o(1000);
  ControlMap& m = o.m();
  const uint32_t count = m->segment_count.load();
  const uint64_t nonce = m->segment_nonces[0].load();
  CHECK_CORRUPT({
    auto q = Pool::attach(o.tok, o.cfg);
    q->stats();  // maps segment 0
    // Entries past the table are the words after it (nonces first): 0
    // reads as "retired", which must not be taken as a free pass.
    m->segment_nonces[0].store(0);
    m->segment_count.store(BlockRef::kMaxSegments + 900);
    q->stats();
  });
  m->segment_nonces[0].store(nonce);
  m->segment_count.store(count);
  CHECK_NOTHROW(o.p->verify());
}

TEST(corrupt_segment_size_that_the_file_does_not_have) {
  OnePool o(1000);
  const uint64_t size = o.m()->segment_sizes[0].load();
  o.m()->segment_sizes[0].store(uint64_t{1} << 60);
  CHECK_CORRUPT(Pool::attach(o.tok, o.cfg)->stats());
  o.m()->segment_sizes[0].store(size);
  CHECK_NOTHROW(o.p->verify());
}

TEST(corrupt_free_link_in_a_pool_raises_pool_error) {
  OnePool o(100000);
  // The free rest of the segment, right after the block: the next
  // allocation of that size takes it off its list.
  BlockHeader* k = o.header();
  auto* rest = reinterpret_cast<BlockHeader*>(reinterpret_cast<unsigned char*>(k) + k->size());
  REQUIRE(!rest->used());
  const uint64_t saved = rest->free_links.next;
  rest->free_links.next = BlockRef(1234, 1u << 30).bits();
  CHECK_CORRUPT(Pool::attach(o.tok, o.cfg)->allocate(100000, false, Mode::kSlow));
  rest->free_links.next = saved;
  CHECK_NOTHROW(o.p->verify());
}

// A slot's hold list is shared memory too: a reference to something that is
// not the slot's list, or a length past its room, is refused, never followed.
TEST(corrupt_hold_list_reference_or_length_raises_pool_error) {
  OnePool o(1000);
  ProcessSlot& mine = o.m()->table.slots[o.p->slot()];
  const uint64_t ref = mine.holds_ref.load();
  const uint32_t length = mine.holds_length.load();
  for (uint64_t bad : {BlockRef(1234, 1u << 30).bits(), BlockRef(0, 64 * 3 + 8).bits(),
                       // the block the test holds: an array, not a list
                       BlockRef(o.block->ref).bits()}) {
    mine.holds_ref.store(bad);
    CHECK_CORRUPT(o.p->allocate(100, false, Mode::kSlow));
    CHECK_CORRUPT(Pool::attach(o.tok, o.cfg)->verify());
  }
  mine.holds_ref.store(ref);
  mine.holds_length.store(1u << 20);
  CHECK_CORRUPT(o.p->allocate(100, false, Mode::kSlow));
  mine.holds_length.store(length);
  CHECK_NOTHROW(o.p->verify());
}

// ------------------------------------------------------------ segment files

// A file under a pool's name that is not one the pool made: refused with
// kPool, never mapped.
TEST(segment_files_of_the_wrong_mode_owner_or_kind_are_refused) {
  const std::string tok = new_token();
  const std::string name = control_name(tok), path = "/dev/shm" + name;
  auto make = [&](mode_t mode) {
    ::unlink(path.c_str());
    const int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, kControlBytes) == 0);
    REQUIRE(::fchmod(fd, mode) == 0);
    ::close(fd);
  };
  auto refused = [&](const char* why) {
    Mapping m;
    try {
      open_segment(name, kControlBytes, 0, &m);
      record_failure(__FILE__, __LINE__, std::string("opened a segment that is ") + why);
    } catch (const CoreError& e) {
      CHECK_EQ(static_cast<int>(e.kind()), static_cast<int>(ErrorKind::kPool));
      CHECK(std::string(e.what()).find(path) != std::string::npos);
    }
    CHECK(!m);
  };
  make(0666);
  refused("world-writable");
  make(0640);
  refused("group-readable");
  make(0600);
  {
    Mapping m;
    CHECK(open_segment(name, kControlBytes, 0, &m) && m);  // exactly 0600, ours: fine
  }
  if (::geteuid() == 0) {  // root may give a file away: another user's file
    REQUIRE(::chown(path.c_str(), 65534, 65534) == 0);
    refused("another user's");
    CHECK_THROWS(ErrorKind::kPool, Pool::attach(tok, make_config(64u << 20, 1u << 20)));
    CHECK(shm_exists(name));  // ... and not ours to remove
    Pool::clean_stale(false, "");
    CHECK(shm_exists(name));
  }
  ::unlink(path.c_str());
  const std::string target = "/dev/shm" + control_name(new_token());
  make(0600);
  REQUIRE(::rename(path.c_str(), target.c_str()) == 0);
  REQUIRE(::symlink(target.c_str(), path.c_str()) == 0);
  refused("a symbolic link");
  ::unlink(path.c_str());
  ::unlink(target.c_str());
}

}  // namespace
}  // namespace pap::test
