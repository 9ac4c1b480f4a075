#include "core/pool_events.hpp"

#include <new>

#include "core/pool_snapshot.hpp"

namespace pap {
namespace {

std::string size_text(uint64_t bytes) {
  return human_bytes(bytes) + " (" + std::to_string(bytes) + " bytes)";
}

std::string count(uint64_t n, const char* one, const char* many) {
  return std::to_string(n) + " " + (n == 1 ? one : many);
}

}  // namespace

std::string describe(const PoolEvent& e) {
  if (e.kind == PoolEvent::Kind::kReclaim) {
    const std::string who =
        e.reserved ? "a fork child of pid " + std::to_string(e.pid) + " that died before attaching"
                   : "dead process pid " + std::to_string(e.pid);
    return "pyarraypool: reclaimed " + count(e.blocks, "block", "blocks") + " of " +
           size_text(e.bytes) + " held by " + who +
           (e.held_lock ? " (it died holding the pool's lock, which was repaired)" : "") + "; " +
           size_text(e.freed_bytes) + " returned to the pool";
  }
  const std::string sender =
      e.pid ? "made by pid " + std::to_string(e.pid) : std::string("made by an unknown process");
  return "pyarraypool: " + count(e.pickles, "pickle", "pickles") + " of " +
         count(e.blocks, "block", "blocks") + " of " + size_text(e.bytes) + ", " + sender +
         ", never loaded: dropped " + human_seconds(e.age_ns) +
         " after the newest was made (transfer_timeout=" + human_seconds(e.timeout_ns) + "); " +
         size_text(e.freed_bytes) + " returned to the pool";
}

void EventLog::push(const PoolEvent& e) noexcept {
  std::lock_guard<std::mutex> g(mutex_);
  bool kept = false;
  if (events_.size() < kMax) {
    try {
      events_.push_back(e);
      kept = true;
    } catch (...) {  // out of memory: counted like an overflow
    }
  }
  if (!kept) {
    ++dropped_;
    dropped_routine_ += routine(e);
  }
  queued_.store(events_.size() + (dropped_ ? 1 : 0), std::memory_order_relaxed);
}

void EventLog::reset_after_fork_child() {
  new (&mutex_) std::mutex();
  new (&events_) std::vector<PoolEvent>();
  dropped_ = dropped_routine_ = 0;
  queued_.store(0, std::memory_order_relaxed);
}

std::vector<PoolEvent> EventLog::drain(uint64_t* dropped, uint64_t* dropped_routine) {
  std::lock_guard<std::mutex> g(mutex_);
  std::vector<PoolEvent> out;
  out.swap(events_);
  *dropped = dropped_;
  if (dropped_routine) *dropped_routine = dropped_routine_;
  dropped_ = dropped_routine_ = 0;
  queued_.store(0, std::memory_order_relaxed);
  return out;
}

}  // namespace pap
