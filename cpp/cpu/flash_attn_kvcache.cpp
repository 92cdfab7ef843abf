// kernels/flash_attn_kvcache.h compiled once per instruction set; its entry points are called by the other
// attention kernels of the same level. The headers the body uses come first (isa_compile.h says why).
#include "common.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#define IFAST_ISA_BODY "kernels/flash_attn_kvcache.h"
#include "isa_compile.h"
