#include "core/errors.hpp"

#include <cstring>

namespace pap {

void throw_os_error(const std::string& what, int err) {
  throw CoreError(ErrorKind::kOs, what + ": " + std::strerror(err), err);
}

}  // namespace pap
