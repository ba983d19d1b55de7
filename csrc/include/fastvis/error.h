// fastvis: the one error type of the core.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace fastvis {

// What kind of mistake an error reports; the Python bindings map these to
// ValueError / TypeError / RuntimeError.
enum class ErrorKind : int { Value = 0, Type = 1, Runtime = 2 };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& msg) : std::runtime_error(msg), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

namespace detail {
template <class... Args>
[[noreturn]] void throw_error(ErrorKind kind, const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw Error(kind, os.str());
}
}  // namespace detail

}  // namespace fastvis

// FV_CHECK_VALUE(cond, "what", ...) throws fastvis::Error(Value, "what...") when cond is false.
#define FV_CHECK_KIND(kind, cond, ...)                                   \
  do {                                                                   \
    if (!(cond)) ::fastvis::detail::throw_error(kind, __VA_ARGS__);      \
  } while (0)
#define FV_CHECK_VALUE(cond, ...) FV_CHECK_KIND(::fastvis::ErrorKind::Value, cond, __VA_ARGS__)
#define FV_CHECK_TYPE(cond, ...) FV_CHECK_KIND(::fastvis::ErrorKind::Type, cond, __VA_ARGS__)
#define FV_CHECK_RUNTIME(cond, ...) FV_CHECK_KIND(::fastvis::ErrorKind::Runtime, cond, __VA_ARGS__)
