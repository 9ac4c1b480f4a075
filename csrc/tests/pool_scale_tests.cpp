// A pool at its process limit: as many processes attached at once as it
// has slots (kMaxSlots), half of them killed, the rest leaving together.
// What it guards is that nothing the pool does with its processes costs
// the square of their number or waits on one of them forever: attach,
// the lock's probes of its owner, reclaiming the dead, leaving.

#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/pool.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kPoolScale;

// Each child's block, and the word its payload repeats.
constexpr uint64_t kChildBytes = 1000;
uint64_t child_word(uint32_t i) { return splitmix(0x5CA1E000ull + i); }

// What a survivor does once told to end: the three ways a pool process ends.
enum class Ending { kLeave, kExitProcess, kPlainExit };
Ending ending_of(uint32_t i) { return static_cast<Ending>((i / 2) % 3); }
bool killed(uint32_t i) { return i % 2 == 0; }  // every other slot: dead ones between live ones

// A child: attaches, fills a block with its pattern, says so on `ready`
// ('R', or 'F' if it failed: the parent reads exactly one byte per child),
// then waits for EOF on `go` and ends as ending_of(i) says, after checking
// that its block still holds its pattern.
int child_body(const std::string& tok, const PoolConfig& cfg, uint32_t i, Pipe& ready, Pipe& go) {
  ready.close_r();
  go.close_w();
  std::unique_ptr<Pool> p;
  std::optional<Block> b;
  try {
    p = Pool::attach(tok, cfg);
    b = p->allocate(kChildBytes, false, Mode::kSlow);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "  child %u: %s\n", i, e.what());
  }
  const char r = b ? 'R' : 'F';
  if (b) fill_pattern(b->payload, b->capacity, child_word(i));
  if (!write_all(ready.w, &r, 1) || !b) return 1;
  char x;
  while (read_all(go.r, &x, 1)) {
  }
  CHILD_CHECK(check_pattern(b->payload, b->capacity, child_word(i)));
  switch (ending_of(i)) {
    case Ending::kLeave:
      p->leave();
      break;
    case Ending::kExitProcess:
      p->exit_process();
      break;
    case Ending::kPlainExit:
      break;
  }
  return 0;
}

TEST(pool_with_every_slot_taken) {
  // The child count is the slot count, whatever the build: a sanitizer
  // build runs the same test.
  constexpr uint32_t kChildren = kMaxSlots - 1;
  const auto t0 = Clock::now();
  auto phase = [&](const char* what) { std::printf("    %6.2f s  %s\n", seconds_since(t0), what); };
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(256u << 20, 16u << 20);
  Pipe ready, go;
  std::vector<pid_t> pids(kChildren, -1);
  // Children end themselves (alarm) and with us (PR_SET_PDEATHSIG) if this
  // test is cut short.
  const ChildOptions opts{110, true, "scale child"};
  uint32_t ok = 0;
  auto start = [&](uint32_t from, uint32_t to) {
    for (uint32_t i = from; i < to; ++i) {
      pids[i] = fork_child([&, i] { return child_body(tok, cfg, i, ready, go); }, opts);
      REQUIRE(pids[i] > 0);
    }
    for (uint32_t i = from; i < to; ++i) {
      char r = 0;
      REQUIRE(read_all(ready.r, &r, 1));
      ok += r == 'R';
    }
  };
  // A child makes the pool (slot 0) and is among those killed, and we
  // attach last, into the last slot: the slots before ours are dead or
  // gone by the time the survivors leave, the worst case for a search
  // that scans the table from its start for a live process.
  start(0, 1);
  start(1, kChildren);
  CHECK_EQ(ok, kChildren);
  phase("forked and attached");
  Attached p(tok, cfg);
  CHECK_EQ(p->slot(), kMaxSlots - 1);
  const uint64_t before_mine = p->stats().used_bytes;
  auto mine = p->allocate(kChildBytes, false, Mode::kSlow);
  REQUIRE(mine);
  const uint64_t mine_word = child_word(kMaxSlots);
  fill_pattern(mine->payload, mine->capacity, mine_word);
  // Every child's block has the size of ours.
  const uint64_t block = p->stats().used_bytes - before_mine;
  REQUIRE(block >= kChildBytes);
  const uint64_t base_used = before_mine - uint64_t{kChildren} * block;  // an empty pool's
  ready.close_w();
  go.close_r();

  PoolStats s = p->stats();
  CHECK_EQ(s.processes, kMaxSlots);
  CHECK_EQ(s.live_blocks, uint64_t{kChildren} + 1);
  CHECK_EQ(s.used_bytes, base_used + (uint64_t{kChildren} + 1) * block);
  phase("stats");

  // One more is one too many, and says so.
  bool refused = false;
  try {
    Pool::attach(tok, cfg);
  } catch (const CoreError& e) {
    refused = e.kind() == ErrorKind::kPool && std::strstr(e.what(), "too many processes");
    if (!refused) std::printf("    the refusal: %s\n", e.what());
  }
  CHECK(refused);
  phase("one more refused");

  uint32_t dead = 0;
  for (uint32_t i = 0; i < kChildren; ++i)
    if (killed(i)) {
      ::kill(pids[i], SIGKILL);
      ++dead;
    }
  for (uint32_t i = 0; i < kChildren; ++i)
    if (killed(i)) CHECK_EQ(wait_child(pids[i]), 128 + SIGKILL);
  phase("half killed");
  CHECK_EQ(p->collect(), uint64_t{dead} * block);
  phase("collected");
  s = p->stats();
  CHECK_EQ(s.processes, kMaxSlots - dead);
  CHECK_EQ(s.live_blocks, uint64_t{kChildren} - dead + 1);
  CHECK_EQ(s.used_bytes, base_used + (uint64_t{kChildren} - dead + 1) * block);
  CHECK_NOTHROW(p->verify());
  phase("stats and verify");

  go.close_w();  // EOF: every survivor checks its block and ends at once
  int failed = 0;
  for (uint32_t i = 0; i < kChildren; ++i)
    if (!killed(i)) failed += wait_child(pids[i]) != 0;
  CHECK_EQ(failed, 0);
  phase("survivors ended");
  p->collect();
  s = p->stats();
  CHECK_EQ(s.processes, 1u);
  CHECK_EQ(s.live_blocks, 1u);
  CHECK_EQ(s.used_bytes, base_used + block);
  CHECK_NOTHROW(p->verify());
  CHECK(check_pattern(mine->payload, mine->capacity, mine_word));
  CHECK(p->release(mine->ref, mine->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, base_used);
  p->leave();
  CHECK(shm_entries(tok).empty());
  phase("left");
}

}  // namespace
}  // namespace pap::test
