// The one "abandoned? then remove" decision for one pool
// (Pool::remove_if_abandoned, which clean_stale makes for each pool): a pool
// is removed once every process of it is dead, never while one lives or
// while its program's root may still need it.

#include <signal.h>
#include <unistd.h>

#include <string>
#include <utility>
#include <vector>

#include "core/pool.hpp"
#include "core/process_table.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kPoolKeeper;
using Fate = Pool::Fate;

const PoolConfig kCfg = make_config(64u << 20, 2u << 20);

// A child that makes the pool `tok` (recording `root`), allocates (so that
// a data segment exists), tells its pool's instance, and waits to be told
// to exit, which it does attached, without leaving: as if it was killed.
class PoolUser {
 public:
  explicit PoolUser(const std::string& tok, ProgramRoot root = {}) {
    pid_ = spawn([&] {
      go_.close_w();
      auto c = Pool::attach(tok, kCfg, root);
      CHILD_CHECK(c->allocate(100000, false, Mode::kSlow));
      CHILD_CHECK(write_string(out_.w, c->instance_id()));
      char byte;
      while (::read(go_.r, &byte, 1) > 0) {
      }
      return 0;
    });
    out_.close_w();
    go_.close_r();
    instance_ = read_string(out_.r).value_or("");
  }
  ~PoolUser() {
    if (pid_ > 0) exit();
  }
  PoolUser(const PoolUser&) = delete;
  PoolUser& operator=(const PoolUser&) = delete;
  const std::string& instance() const { return instance_; }
  // Lets it exit, still attached; its exit status.
  int exit() {
    go_.close_w();
    return wait_child(std::exchange(pid_, -1));
  }
  int kill() {
    ::kill(pid_, SIGKILL);
    return wait_child(std::exchange(pid_, -1));
  }

 private:
  Pipe out_, go_;
  pid_t pid_ = -1;
  std::string instance_;
};

TEST(pool_remove_if_abandoned) {
  std::vector<std::string> names;
  const std::string none = new_token();
  CHECK(Pool::remove_if_abandoned(none, "", false, &names) == Fate::kGone);
  CHECK(names.empty());
  CHECK(Pool::remove_if_abandoned("not a token", "", false, &names) == Fate::kGone);

  // In use: this process is attached.
  const std::string live = new_token();
  {
    Attached a(live, kCfg);
    CHECK(a->allocate(100000, false, Mode::kSlow));
    CHECK(Pool::remove_if_abandoned(live, "", false, &names) == Fate::kInUse);
    CHECK(Pool::remove_if_abandoned(live, a->instance_id(), false, &names) == Fate::kInUse);
    // Watching another instance: not the caller's pool, left alone.
    CHECK(Pool::remove_if_abandoned(live, std::string(32, '0'), false, &names) == Fate::kGone);
    CHECK(names.empty());
    CHECK_EQ(shm_entries(live).size(), size_t{2});
    CHECK_NOTHROW(a->verify());
  }
  CHECK(shm_entries(live).empty());

  // Abandoned: its only process died attached.
  const std::string tok = new_token();
  PoolUser user(tok);
  const std::string instance = user.instance();
  REQUIRE(!instance.empty());
  CHECK(Pool::remove_if_abandoned(tok, instance, false, &names) == Fate::kInUse);  // alive
  CHECK_EQ(user.exit(), 0);
  const std::vector<std::string> left = shm_entries(tok);
  CHECK_EQ(left.size(), size_t{2});
  CHECK(Pool::remove_if_abandoned(tok, instance, true, &names) == Fate::kRemoved);
  CHECK_EQ(names.size(), size_t{2});
  CHECK(names.back() == "pyarraypool-" + tok);  // the control segment last
  CHECK(shm_entries(tok) == left);              // a dry run removes nothing
  names.clear();
  CHECK(Pool::remove_if_abandoned(tok, std::string(32, '0'), false, &names) == Fate::kGone);
  CHECK(shm_entries(tok) == left);
  CHECK(Pool::remove_if_abandoned(tok, instance, false, &names) == Fate::kRemoved);
  CHECK_EQ(names.size(), size_t{2});
  CHECK(shm_entries(tok).empty());
  CHECK(Pool::remove_if_abandoned(tok, instance, false, &names) == Fate::kGone);
}

TEST(pool_remove_if_abandoned_keeps_a_pool_for_a_live_root) {
  // The program's root (this process) has not attached yet and may still
  // load what its dead worker sent: the pool is kept while it lives.
  const std::string tok = new_token();
  const ProgramRoot me{static_cast<int>(::getpid()), process_start_time(::getpid())};
  PoolUser user(tok, me);
  const std::string instance = user.instance();
  REQUIRE(!instance.empty());
  CHECK_EQ(user.exit(), 0);
  CHECK(Pool::remove_if_abandoned(tok, instance, false, nullptr) == Fate::kInUse);
  CHECK_EQ(shm_entries(tok).size(), size_t{2});
  // The root's own exit removes it (as the last to leave).
  auto p = Pool::attach_existing(tok);
  REQUIRE(p);
  p->leave();
  CHECK(shm_entries(tok).empty());
}

}  // namespace
}  // namespace pap::test
