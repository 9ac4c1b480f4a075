// The one "abandoned? then remove" decision (Pool::remove_if_abandoned) that
// clean_stale and the pool's keeper share, and the keeper's loop
// (core/keeper.hpp): a pool is removed once every process of it is dead,
// never while one lives or while its program's root may still need it, and
// the keeper ends when someone else removes the pool.

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "core/keeper.hpp"
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

// Exit status of a keeper child: 10 removed, 11 gone.
pid_t keeper(const std::string& tok, const std::string& instance) {
  return spawn([&] {
    KeeperEnd end = keep_pool(tok, instance, std::chrono::milliseconds(20));
    return end == KeeperEnd::kRemoved ? 10 : 11;
  });
}

// The exit status of `pid` if it ends within `seconds`, else -1.
int wait_child_for(pid_t pid, double seconds) {
  const auto t0 = Clock::now();
  while (seconds_since(t0) < seconds) {
    int status;
    if (::waitpid(pid, &status, WNOHANG) == pid)
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    ::usleep(5000);
  }
  return -1;
}

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

TEST(keeper_removes_the_pool_when_its_last_process_dies) {
  const std::string tok = new_token();
  PoolUser user(tok);
  const std::string instance = user.instance();
  REQUIRE(!instance.empty());
  pid_t k = keeper(tok, instance);
  CHECK_EQ(wait_child_for(k, 0.3), -1);  // the pool is in use: it keeps watching
  CHECK_EQ(shm_entries(tok).size(), size_t{2});
  CHECK_EQ(user.kill(), 128 + SIGKILL);
  CHECK_EQ(wait_child_for(k, 2.0), 10);
  CHECK(shm_entries(tok).empty());
}

TEST(keeper_ends_when_the_pool_is_removed_by_its_last_process) {
  const std::string tok = new_token();
  auto p = Pool::attach(tok, kCfg);
  REQUIRE(p);
  pid_t k = keeper(tok, p->instance_id());
  CHECK_EQ(wait_child_for(k, 0.2), -1);
  p->leave();  // the last process removes the pool itself
  CHECK(shm_entries(tok).empty());
  CHECK_EQ(wait_child_for(k, 2.0), 11);
  // A new pool under the same name is another instance: not the keeper's.
  Attached again(tok, kCfg);
  pid_t stale = keeper(tok, p->instance_id());
  CHECK_EQ(wait_child_for(stale, 2.0), 11);
  CHECK_EQ(shm_entries(tok).size(), size_t{1});
}

}  // namespace
}  // namespace pap::test
