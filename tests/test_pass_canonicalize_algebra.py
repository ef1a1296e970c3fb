"""Canonicalization of arithmetic and views: identities that disappear (and the look-alikes that must
stay), lossless casts, identity views and chains of views. Each case is IR text in, IR text out, checked
for idempotence and numerics by tests/canonicalize_checks.py."""
from __future__ import annotations

import numpy as np

from canonicalize_checks import check
from fusec.passes.canonicalize import simplify_algebra, simplify_views


# --- algebra ------------------------------------------------------------------------------------------

def test_identities_of_arithmetic_disappear():
    check(simplify_algebra, """
        %0 = input {index=0, name="x"} : f32[2,3]
        %1 = input {index=1, name="m"} : bool[2,3]
        %2 = const {value=1.0} : f32[]
        %3 = const {value=-0.0} : f32[2,3]
        %4 = mul %0, %2 : f32[2,3]
        %5 = mul %2, %4 : f32[2,3]
        %6 = add %5, %3 : f32[2,3]
        %7 = add %3, %6 : f32[2,3]
        %8 = add %7, %3 : f32[2,3]
        %9 = div %8, %2 : f32[2,3]
        %10 = where %1, %9, %9 : f32[2,3]
        %11 = neg %10 : f32[2,3]
        %12 = neg %11 : f32[2,3]
        %13 = not %1 : bool[2,3]
        %14 = not %13 : bool[2,3]
        %15 = const {value=true} : bool[]
        %16 = where %15, %14, %1 : bool[2,3]
        %17 = const {value=false} : bool[1,3]
        %18 = where %17, %1, %16 : bool[2,3]
        return %12, %18
    """, """
        %0 = input {index=0, name="x"} : f32[2,3]
        %1 = input {index=1, name="m"} : bool[2,3]
        return %0, %1
    """)


def test_adding_positive_zero_is_not_an_identity():
    """-0.0 + 0.0 is +0.0 (1 / it is +inf in eager), so x + 0.0 and x - (-0.0) stay; x - 0.0 goes."""
    check(simplify_algebra, """
        %0 = input {index=0, name="x"} : f32[3]
        %1 = const {value=0.0} : f32[]
        %2 = const {value=-0.0} : f32[]
        %3 = add %0, %1 : f32[3]
        %4 = sub %3, %2 : f32[3]
        %5 = sub %4, %1 : f32[3]
        %6 = const {value=0} : i64[]
        %7 = input {index=1, name="n"} : i64[3]
        %8 = add %7, %6 : i64[3]
        return %5, %8
    """, """
        %0 = input {index=0, name="x"} : f32[3]
        %1 = const {value=0.0} : f32[]
        %2 = const {value=-0.0} : f32[]
        %3 = add %0, %1 : f32[3]
        %4 = sub %3, %2 : f32[3]
        %5 = input {index=1, name="n"} : i64[3]
        return %4, %5
    """)


def test_identities_that_broadcast_or_use_non_splat_constants_stay():
    check(simplify_algebra, """
        %0 = input {index=0, name="x"} : f32[4]
        %1 = input {index=1, name="m"} : bool[3,1]
        %2 = const {value=0.0} : f32[3,4]
        %3 = add %0, %2 : f32[3,4]
        %4 = const {value=1.0} : f64[]
        %5 = const {key="ones"} : f32[4]
        %6 = mul %0, %5 : f32[4]
        %7 = where %1, %6, %6 : f32[3,4]
        %8 = add %7, %3 : f32[3,4]
        return %8
    """, """
        %0 = input {index=0, name="x"} : f32[4]
        %1 = input {index=1, name="m"} : bool[3,1]
        %2 = const {value=0.0} : f32[3,4]
        %3 = add %0, %2 : f32[3,4]
        %4 = const {key="ones"} : f32[4]
        %5 = mul %0, %4 : f32[4]
        %6 = where %1, %5, %5 : f32[3,4]
        %7 = add %6, %3 : f32[3,4]
        return %7
    """, {"ones": np.ones(4, np.float32)})


def test_casts_fold_only_through_lossless_widening():
    check(simplify_algebra, """
        %0 = input {index=0, name="x"} : f32[4]
        %1 = input {index=1, name="d"} : f64[4]
        %2 = cast %0 {dtype="f32"} : f32[4]
        %3 = cast %2 {dtype="f64"} : f64[4]
        %4 = cast %3 {dtype="f32"} : f32[4]
        %5 = cast %1 {dtype="f32"} : f32[4]
        %6 = cast %5 {dtype="f64"} : f64[4]
        %7 = cast %0 {dtype="f64"} : f64[4]
        %8 = cast %7 {dtype="f16"} : f16[4]
        return %4, %6, %8
    """, """
        %0 = input {index=0, name="x"} : f32[4]
        %1 = input {index=1, name="d"} : f64[4]
        %2 = cast %1 {dtype="f32"} : f32[4]
        %3 = cast %2 {dtype="f64"} : f64[4]
        %4 = cast %0 {dtype="f16"} : f16[4]
        return %0, %3, %4
    """)


# --- views --------------------------------------------------------------------------------------------

def test_identity_views_disappear():
    check(simplify_views, """
        %0 = input {index=0, name="x"} : f32[2,3]
        %1 = reshape %0 {shape=[2,3]} : f32[2,3]
        %2 = permute %1 {perm=[0,1]} : f32[2,3]
        %3 = expand %2 {shape=[2,3]} : f32[2,3]
        %4 = slice %3 {axis=1, start=0, stop=3, step=1} : f32[2,3]
        %5 = concat %4 {axis=0} : f32[2,3]
        return %5
    """, """
        %0 = input {index=0, name="x"} : f32[2,3]
        return %0
    """)


def test_chains_of_views_merge():
    check(simplify_views, """
        %0 = input {index=0, name="x"} : f32[2,3,4]
        %1 = reshape %0 {shape=[6,4]} : f32[6,4]
        %2 = reshape %1 {shape=[24]} : f32[24]
        %3 = permute %0 {perm=[1,2,0]} : f32[3,4,2]
        %4 = permute %3 {perm=[2,0,1]} : f32[2,3,4]
        %5 = permute %3 {perm=[1,0,2]} : f32[4,3,2]
        %6 = reshape %0 {shape=[1,24]} : f32[1,24]
        %7 = expand %6 {shape=[1,24]} : f32[1,24]
        %8 = reshape %7 {shape=[1,1,24]} : f32[1,1,24]
        %9 = expand %8 {shape=[1,5,24]} : f32[1,5,24]
        %10 = expand %9 {shape=[3,5,24]} : f32[3,5,24]
        %11 = slice %0 {axis=2, start=1, stop=4, step=1} : f32[2,3,3]
        %12 = slice %11 {axis=2, start=0, stop=3, step=2} : f32[2,3,2]
        %13 = slice %12 {axis=0, start=1, stop=2, step=1} : f32[1,3,2]
        return %2, %4, %5, %10, %13
    """, """
        %0 = input {index=0, name="x"} : f32[2,3,4]
        %1 = reshape %0 {shape=[24]} : f32[24]
        %2 = permute %0 {perm=[2,1,0]} : f32[4,3,2]
        %3 = reshape %0 {shape=[1,1,24]} : f32[1,1,24]
        %4 = expand %3 {shape=[3,5,24]} : f32[3,5,24]
        %5 = slice %0 {axis=2, start=1, step=2, stop=4} : f32[2,3,2]
        %6 = slice %5 {axis=0, start=1, step=1, stop=2} : f32[1,3,2]
        return %1, %0, %2, %4, %6
    """)
