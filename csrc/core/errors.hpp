// Errors raised by the core. The core is plain C++ and reports failures with
// exceptions; the binding layer catches every one of them at the CPython
// boundary and turns it into the matching Python exception, so none crosses
// into the interpreter.
#pragma once

#include <stdexcept>
#include <string>

namespace pap {

enum class ErrorKind {
  kPool,           // generic pool failure (PoolError)
  kPoolFull,       // request does not fit under max_bytes or in /dev/shm
  kStaleHandle,    // block gone, or handle of another pool
  kInvalidHandle,  // malformed handle bytes or geometry
  kOs,             // a system call failed (carries errno)
};

class CoreError : public std::runtime_error {
 public:
  CoreError(ErrorKind kind, const std::string& what, int err = 0)
      : std::runtime_error(what), kind_(kind), errno_(err) {}
  ErrorKind kind() const noexcept { return kind_; }
  int error_number() const noexcept { return errno_; }

 private:
  ErrorKind kind_;
  int errno_;
};

// Throws kOs with "<what>: <strerror(err)>" and the errno attached.
[[noreturn]] void throw_os_error(const std::string& what, int err);

}  // namespace pap
