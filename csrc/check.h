// Error messages without iostreams. TORCH_CHECK formats its arguments through c10::str's std::ostringstream,
// compiled into this library. A toolchain that links libstdc++ statically (seen: the H200 machine's /opt/gcc,
// whose extension had no libstdc++.so in NEEDED) gives the library its own copy, whose stream locale was never
// set up: formatting a number there crashed the process (cuda-gdb: std::ostream::_M_insert<long> inside
// moe_compiler_cutlass.so) instead of raising. Messages are built with std::to_string and concatenation (no
// locale) and handed to TORCH_CHECK as one C string, which c10 passes through without a stream; libc10 (the
// system libstdc++) makes the exception.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace moe_cutlass {

inline std::string dims(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

[[noreturn]] inline void fail(const std::string& message) {
  TORCH_CHECK(false, message.c_str());
  __builtin_unreachable();
}

}  // namespace moe_cutlass

// MOE_CHECK(cond, message): message (a std::string expression) is built only when cond fails.
#define MOE_CHECK(cond, message) \
  do {                           \
    if (!(cond)) ::moe_cutlass::fail(message); \
  } while (0)
