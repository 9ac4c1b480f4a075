// Whether a process slot's owner is alive, asked of the kernel.
//
// Each attached process holds an open-file-description (OFD) write lock on
// one byte of its pool's control file: byte `slot`. The kernel drops such a
// lock when the last descriptor of that open file description is closed,
// which happens when the process dies, however it dies, and when it execs
// (the descriptor is O_CLOEXEC; the kernel lets go of it on the way back to
// the new program, so a watcher can see the exec a moment before the lock
// goes). Any other process can ask, with F_OFD_GETLK,
// whether the byte is still locked. So a slot's owner is alive exactly while
// its byte is locked:
//   - no pid is looked up, so processes in different pid namespaces that
//     share /dev/shm judge each other correctly, and pid reuse is moot;
//   - a fork child that execs gives up its slot at the exec;
//   - a fork child inherits its parent's descriptors, hence the parent's
//     lock: the child closes the inherited one at once (a pthread_atfork
//     child handler) and keeps a descriptor of its own, opened and locked
//     on the child's byte by the parent before the fork (Pool::before_fork).
// F_OFD_GETLK asked through a descriptor that holds the lock itself reports
// no conflict: a process must not ask about its own slot.
// A shared mapping keeps the open file description it was made from alive
// (in fork children too), so locks are never taken through a description
// that was mapped: the control segment is mapped through one, and locked
// through another.
#pragma once

#include <cstdint>
#include <vector>

namespace pap {

// An owned file descriptor.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

namespace liveness {

// Takes the lock on byte `slot` through `fd` without waiting. False if
// another open file description holds it (its owner is alive).
bool lock_slot(int fd, uint32_t slot);
// Drops the lock on byte `slot` held through `fd`.
void unlock_slot(int fd, uint32_t slot);
// Whether another open file description holds byte `slot`. When the kernel
// cannot answer, the answer is "alive": calling a live process dead frees
// memory it uses, while the opposite only delays a reclaim.
bool held_by_other(int fd, uint32_t slot);
// Whether another open file description holds any byte of [first, first + n).
bool any_held_by_other(int fd, uint32_t first, uint32_t n);

// Which of bytes [0, n) of the file `fd` is open on some process holds a
// lock on, as /proc/locks lists them: one read for the whole table, where
// asking F_OFD_GETLK about each byte costs the square of the number of
// locks (each question walks the file's whole list of locks). Empty if
// /proc/locks cannot be read. Only a hint, and only in the safe direction:
// a byte listed is treated as alive without asking (wrong, it would only
// delay a reclaim); a byte not listed is still asked about with
// held_by_other before anyone is called dead.
std::vector<bool> locked_bytes_hint(int fd, uint32_t n);

}  // namespace liveness
}  // namespace pap
