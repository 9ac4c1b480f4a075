// The pool's fork hooks: a forked child inherits its parent's attachment
// and its holds, and both go on using the pool.

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <exception>

#include "core/pool.hpp"
#include "core/shm_segment.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kPoolFork;

TEST(pool_fork_hooks) {
  const std::string tok = new_token();
  Attached p(tok, make_config(64u << 20, 2u << 20));
  auto b = p->allocate(4096, false, Mode::kSlow);
  REQUIRE(b);
  const uint64_t word = 0xfeedfacecafebeefull;
  fill_pattern(b->payload, b->capacity, word);
  Pipe go;
  p->before_fork();
  p->lock_for_fork();
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    int rc = 0;
    try {
      rc = [&]() -> int {
        ::alarm(60);
        p->after_fork_child();
        char c;
        CHILD_CHECK(read_all(go.r, &c, 1));  // the parent has released the block
        PoolStats s = p->stats();
        CHILD_CHECK(s.live_blocks >= 1);
        CHILD_CHECK(s.processes == 2);
        CHILD_CHECK(check_pattern(b->payload, b->capacity, word));
        auto a = attach_handle(*p, handle_of(*p, *b, 0));
        CHILD_CHECK(a && a->payload == b->payload);
        p->verify();
        CHILD_CHECK(p->release(b->ref, b->generation, Mode::kSlow));
        CHILD_CHECK(p->stats().live_blocks == 0);
        p->leave();  // not the last: the parent stays
        return 0;
      }();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  child: %s\n", e.what());
      rc = 98;
    }
    ::_exit(rc);
  }
  p->after_fork_parent();
  REQUIRE(pid > 0);
  go.close_r();
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  PoolStats s = p->stats();
  CHECK_EQ(s.live_blocks, 1u);  // the child inherited a hold on it
  CHECK_EQ(s.processes, 2u);
  char c = 1;
  CHECK(write_all(go.w, &c, 1));
  CHECK_EQ(wait_child(pid), 0);
  s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.live_blocks, 0u);
  CHECK_EQ(s.processes, 1u);
  CHECK(shm_exists(control_name(tok)));
  CHECK_NOTHROW(p->verify());
  // The pool still works in the parent after the fork.
  auto d = p->allocate(100, false, Mode::kFast);
  CHECK(d);
  if (d) CHECK(p->release(d->ref, d->generation, Mode::kFast));
  p->leave();
  CHECK(shm_entries(tok).empty());
}

}  // namespace
}  // namespace pap::test
