// First include of the per-capability builds (vec_avx2.cpp, vec_avx512.cpp, vec_default.cpp).
//
// The headers below are compiled for the baseline target *before* a build switches the
// compiler to its ISA: the inline functions they define (std::, c10::) are then identical in
// every object file, so the linker can never keep an AVX-512 copy of one that baseline code
// calls.  Only vec_kernels.h and ATen's vec headers (both in per-capability namespaces) are
// compiled for the wider ISA.
#pragma once
#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <complex>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/bit_cast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>

#include "vec_table.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMCORE_VEC_X86 1
#else
#define MMCORE_VEC_X86 0
#endif
