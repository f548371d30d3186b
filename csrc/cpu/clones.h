// RSO_CPU_CLONES: give a CPU inner loop AVX-512 and AVX2+FMA clones chosen at load time next to the
// baseline one (GCC function multiversioning), so the hand-written passes vectorise on the
// machines that have it while the extension still loads everywhere. Lambdas are not
// cloned: put the loop in a named function.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RSO_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RSO_CPU_CLONES
#endif
