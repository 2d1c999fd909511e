// Host runner stand-in for <cuda_runtime.h> (tests/host/runner/include/rk_host.h).
#pragma once
#include "rk_host.h"
