"""Restoration operators y = A x (issue 22, item 1), checked against dense matrices built independently of them.

Truths on small images: A equals its reference matrix; A⁺ satisfies the four Penrose conditions (so it is the
Moore–Penrose pseudo-inverse, the only matrix that does) and equals torch.linalg.pinv; ⟨A x, y⟩ = ⟨x, Aᵀ y⟩; the SVD
view rebuilds A with orthogonal U and V (DDRM's H_functions). The regularised blur keeps ‖A A⁺_ε A − A‖₂ ≤ √ε / 2.
The checks fail on a wrong A⁺ (bilinear upsampling for super-resolution, Aᵀ for colorization).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from custom_pipelines.tutorial_operators import (
    Blur,
    Colorization,
    Denoising,
    Inpainting,
    LinearOperator,
    RandomProjection,
    SuperResolution,
)

TOL = 1e-10  # float64 on images of at most 108 pixels: the identities hold to ~1e-13
MASK = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.float64)
MASK3 = torch.stack([MASK, 1 - MASK, torch.ones(4, 4, dtype=torch.float64)])


def conv_matrix(kernel, shape, padding):
    """F.conv2d (cross-correlation) on the identity basis: the blur's matrix without the operator's code."""
    c, h, w = shape
    n = c * h * w
    eye = torch.eye(n, dtype=torch.float64).reshape(n, c, h, w)
    kh, kw = kernel.shape
    weight = kernel.to(torch.float64).expand(c, 1, kh, kw)
    if padding == "circular":
        out = F.conv2d(F.pad(eye, (kw // 2, kw // 2, kh // 2, kh // 2), mode="circular"), weight, groups=c)
    else:
        out = F.conv2d(eye, weight, padding=(kh // 2, kw // 2), groups=c)
    return out.reshape(n, n).T


def pooling_matrix(k, shape):
    c, h, w = shape
    rows = [
        torch.kron(torch.eye(s // k, dtype=torch.float64), torch.full((1, k), 1 / k, dtype=torch.float64))
        for s in (h, w)
    ]
    return torch.kron(torch.eye(c, dtype=torch.float64), torch.kron(*rows))


# (id, operator factory, image shape, the reference dense matrix as a function of the operator)
CASES = [
    ("denoising", Denoising, (3, 4, 4), lambda op: torch.eye(48, dtype=torch.float64)),
    (
        "inpainting-hw",
        lambda: Inpainting(MASK),
        (3, 4, 4),
        lambda op: torch.eye(48)[MASK.expand(3, 4, 4).flatten() == 1].double(),
    ),
    ("inpainting-chw", lambda: Inpainting(MASK3), (3, 4, 4), lambda op: torch.eye(48)[MASK3.flatten() == 1].double()),
    (
        "colorization",
        Colorization,
        (3, 4, 4),
        lambda op: torch.kron(torch.full((1, 3), 1 / 3, dtype=torch.float64), torch.eye(16, dtype=torch.float64)),
    ),
    ("super-resolution-2", lambda: SuperResolution(2), (3, 4, 4), lambda op: pooling_matrix(2, (3, 4, 4))),
    ("super-resolution-3", lambda: SuperResolution(3), (2, 6, 3), lambda op: pooling_matrix(3, (2, 6, 3))),
    (
        "blur-gaussian-circular",
        lambda: Blur.gaussian(3, 0.8),
        (2, 5, 6),
        lambda op: conv_matrix(op.kernel, (2, 5, 6), "circular"),
    ),
    (
        "blur-box-circular-singular",
        lambda: Blur.box(3),
        (2, 6, 6),
        lambda op: conv_matrix(op.kernel, (2, 6, 6), "circular"),
    ),
    (
        "blur-asymmetric-circular",
        lambda: Blur(torch.arange(15.0).reshape(3, 5) / 100),
        (1, 4, 6),
        lambda op: conv_matrix(op.kernel, (1, 4, 6), "circular"),
    ),
    (
        "blur-gaussian-zero",
        lambda: Blur.gaussian(5, 1.0, padding="zero"),
        (2, 5, 6),
        lambda op: conv_matrix(op.kernel, (2, 5, 6), "zero"),
    ),
    (
        "blur-box-zero",
        lambda: Blur.box(3, padding="zero"),
        (1, 6, 6),
        lambda op: conv_matrix(op.kernel, (1, 6, 6), "zero"),
    ),
    ("random-projection", lambda: RandomProjection(20, (3, 4, 4), seed=1), (3, 4, 4), lambda op: op.P),
]
WITH_SVD = [c for c in CASES if "circular" not in c[0]]


def ids(cases):
    return [c[0] for c in cases]


def dense_of(fn, inputs_shape):
    """The matrix of a linear map fn, from its action on the identity basis of a space of shape inputs_shape."""
    n = math.prod(inputs_shape)
    return fn(torch.eye(n, dtype=torch.float64).reshape(n, *inputs_shape)).reshape(n, -1).T


def assert_moore_penrose(A, P, tol=TOL):
    """The four Penrose conditions: P = A⁺, the only matrix that meets them all."""
    assert torch.allclose(A @ P @ A, A, atol=tol), "A A⁺ A ≠ A"
    assert torch.allclose(P @ A @ P, P, atol=tol), "A⁺ A A⁺ ≠ A⁺"
    assert torch.allclose((A @ P).T, A @ P, atol=tol), "A A⁺ is not symmetric"
    assert torch.allclose((P @ A).T, P @ A, atol=tol), "A⁺ A is not symmetric"


def pinv_matrix(op, shape):
    m_shape = op.measurement_shape(shape)
    return dense_of(op.A_pinv, m_shape)


@pytest.mark.parametrize("name, make, shape, reference", CASES, ids=ids(CASES))
def test_A_is_its_reference_matrix(name, make, shape, reference):
    op = make()
    ref = reference(op)
    x = torch.randn(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(op.A(x).flatten(1), x.flatten(1) @ ref.T, atol=TOL)
    assert torch.allclose(op.matrix(shape), ref, atol=TOL)
    assert op.A(x).shape == (2, *op.measurement_shape(shape))


@pytest.mark.parametrize("name, make, shape, reference", CASES, ids=ids(CASES))
def test_A_pinv_is_the_moore_penrose_pseudo_inverse(name, make, shape, reference):
    op = make()
    A, P = reference(op), pinv_matrix(op, shape)
    assert_moore_penrose(A, P)
    assert torch.allclose(P, torch.linalg.pinv(A), atol=1e-8)


@pytest.mark.parametrize("name, make, shape, reference", CASES, ids=ids(CASES))
def test_AT_is_the_adjoint(name, make, shape, reference):
    op = make()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *shape, dtype=torch.float64, generator=g)
    y = torch.randn(3, *op.measurement_shape(shape), dtype=torch.float64, generator=g)
    lhs = (op.A(x) * y).flatten(1).sum(1)
    rhs = (x * op.AT(y)).flatten(1).sum(1)
    assert torch.allclose(lhs, rhs, atol=TOL)
    assert torch.allclose(dense_of(op.AT, op.measurement_shape(shape)), reference(op).T, atol=TOL)


@pytest.mark.parametrize("name, make, shape, reference", WITH_SVD, ids=ids(WITH_SVD))
def test_the_svd_rebuilds_A(name, make, shape, reference):
    op = make()
    svd = op.svd(shape)
    U, s, V = svd.dense()
    A = reference(op)
    m, n = A.shape
    assert U.shape == (m, m) and s.shape == (m,) and V.shape == (n, n)
    S = torch.zeros(m, n, dtype=torch.float64)
    S[range(m), range(m)] = s
    assert torch.allclose(U @ S @ V.T, A, atol=TOL)  # DDRM: H = U S Vᵀ
    assert torch.allclose(U.T @ U, torch.eye(m, dtype=torch.float64), atol=TOL)
    assert torch.allclose(V.T @ V, torch.eye(n, dtype=torch.float64), atol=TOL)
    assert bool((s >= 0).all())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, *shape, dtype=torch.float64, generator=g)
    y = torch.randn(2, *op.measurement_shape(shape), dtype=torch.float64, generator=g)
    assert torch.allclose(svd.H(x), op.A(x), atol=TOL)
    assert torch.allclose(svd.Ht(y), op.AT(y), atol=TOL)
    assert torch.allclose(svd.H_pinv(y), op.A_pinv(y), atol=1e-8)
    assert torch.allclose(svd.V(svd.Vt(x)), x, atol=TOL) and torch.allclose(svd.U(svd.Ut(y)), y, atol=TOL)
    assert svd.add_zeros(torch.ones(2, m, dtype=torch.float64)).shape == (2, n)


@pytest.mark.parametrize("name, make, shape, reference", CASES, ids=ids(CASES))
def test_a_batch_is_its_samples_and_dtype_follows_the_input(name, make, shape, reference):
    op = make()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, *shape, dtype=torch.float64, generator=g)
    y = op.A(x)
    for fn, t in ((op.A, x), (op.AT, y), (op.A_pinv, y)):
        assert torch.allclose(fn(t), torch.cat([fn(t[i : i + 1]) for i in range(3)]), atol=1e-13)
    for dtype in (torch.float32, torch.float64):
        for fn, t in ((op.A, x), (op.AT, y), (op.A_pinv, y)):
            out = fn(t.to(dtype))
            assert out.dtype == dtype and out.device == t.device
            assert torch.allclose(out.double(), fn(t), atol=1e-5)
    if name in ids(WITH_SVD):
        svd = op.svd(shape)
        z = svd.Vt(x.float())
        assert z.dtype == torch.float32 and svd.V(z).dtype == torch.float32
        assert torch.allclose(svd.Vt(x), torch.cat([svd.Vt(x[i : i + 1]) for i in range(3)]), atol=1e-13)


@pytest.mark.parametrize("name, make, shape, reference", CASES, ids=ids(CASES))
def test_the_device_follows_the_input_without_host_reads(name, make, shape, reference):
    """On the `meta` device any host read (.item(), bool(tensor)) would raise: the maps never wait for the host."""
    op = make()
    x = torch.zeros(2, *shape, device="meta")
    y = op.A(x)
    outputs = [y, op.AT(y), op.A_pinv(y)]
    if name in ids(WITH_SVD):
        svd = op.svd(shape)
        outputs += [svd.V(svd.Vt(x)), svd.U(svd.Ut(y)), svd.H(x), svd.H_pinv(y)]
    assert all(t.device.type == "meta" for t in outputs)
    assert outputs[1].shape == outputs[2].shape == x.shape and y.shape == (2, *op.measurement_shape(shape))


@pytest.mark.parametrize("padding", ["circular", "zero"])
@pytest.mark.parametrize("eps", [1e-6, 1e-4, 1e-2])
def test_the_regularised_blur_is_a_pseudo_inverse_within_half_root_eps(padding, eps):
    shape = (1, 6, 6)
    op = Blur.gaussian(5, 1.5, eps=eps, padding=padding)
    A, P = op.matrix(shape), pinv_matrix(op, shape)
    s = torch.linalg.svdvals(A)
    gap = torch.linalg.matrix_norm(A @ P @ A - A, ord=2)
    assert gap <= math.sqrt(eps) / 2 + 1e-12  # max_s s·ε/(s² + ε) ≤ √ε/2
    assert torch.isclose(gap, (s * eps / (s**2 + eps)).max(), atol=1e-10)  # the bound's own formula, exactly
    assert gap > 1e-3 * eps  # ε > 0 is only approximately A⁺


@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_the_blur_pseudo_inverse_is_exact_at_eps_zero_and_the_limit_of_eps(padding):
    shape = (2, 5, 5)
    op = Blur.gaussian(3, 0.6, padding=padding)  # invertible on 5 × 5: A⁺ = A⁻¹
    A, P = op.matrix(shape), pinv_matrix(op, shape)
    assert torch.linalg.svdvals(A).min() > 1e-3
    assert torch.allclose(P @ A, torch.eye(50, dtype=torch.float64), atol=TOL)
    gaps = [(pinv_matrix(Blur.gaussian(3, 0.6, eps=e, padding=padding), shape) - P).abs().max() for e in (1e-4, 1e-8)]
    assert gaps[1] < gaps[0] / 100 and gaps[1] < 1e-5


def test_the_circular_box_blur_has_zero_frequencies_and_eps_zero_drops_them():
    op = Blur.box(3)  # on 6 points, (1 + 2 cos(2πf/6)) / 3 = 0 at f = 2, 4
    A = op.matrix((1, 6, 6))
    assert torch.linalg.matrix_rank(A) < 36
    assert_moore_penrose(A, pinv_matrix(op, (1, 6, 6)))


# --- a wrong A⁺ fails these checks ---------------------------------------------------------------------------------


class BilinearSuperResolution(SuperResolution):
    def _A_pinv(self, y, image_shape):
        return F.interpolate(y, scale_factor=self.factor, mode="bilinear", align_corners=False)


class AdjointColorization(Colorization):
    def _A_pinv(self, y, image_shape):  # Aᵀ, a third of A⁺
        return self._AT(y, image_shape)


@pytest.mark.parametrize("op", [BilinearSuperResolution(2), AdjointColorization()], ids=["bilinear", "adjoint"])
def test_a_wrong_pseudo_inverse_fails(op):
    shape = (3, 4, 4)
    with pytest.raises(AssertionError, match="A A⁺ A ≠ A"):
        assert_moore_penrose(op.matrix(shape), pinv_matrix(op, shape))


# --- validation at the door ----------------------------------------------------------------------------------------


BAD = [
    (
        lambda: SuperResolution(3).A(torch.zeros(1, 3, 4, 4)),
        r"factor=3 does not divide the image size \(H, W\) = \(4, 4\)",
    ),
    (lambda: SuperResolution(0), r"factor=0 must be an integer >= 1"),
    (lambda: SuperResolution(2.0), r"factor=2.0 must be an integer"),
    (lambda: Inpainting(MASK).A(torch.zeros(1, 3, 4, 5)), r"mask has shape \(1, 4, 4\) but the image is"),
    (lambda: Inpainting(MASK3).A(torch.zeros(1, 2, 4, 4)), r"mask has shape \(3, 4, 4\)"),
    (lambda: Inpainting(MASK * 0.5), r"mask must be binary"),
    (lambda: Inpainting(MASK * float("nan")), r"mask has non-finite entries"),
    (lambda: Inpainting(MASK).A_pinv(torch.zeros(1, 7)), r"y has measurement shape \(7,\)"),
    (lambda: Colorization().A(torch.zeros(1, 4, 4, 4)), r"C=4 channels; colorization needs C=3"),
    (lambda: Colorization().A_pinv(torch.zeros(1, 3, 4, 4)), r"y has measurement shape \(3, 4, 4\)"),
    (lambda: RandomProjection(49, (3, 4, 4)), r"m=49 must be an integer with 1 <= m <= n = C·H·W = 48"),
    (lambda: RandomProjection(5, (3, 4, 4)).A(torch.zeros(1, 3, 4, 5)), r"image_shape=\(3, 4, 5\) does not match"),
    (lambda: Blur(torch.ones(2, 3)), r"kernel has shape \(2, 3\)"),
    (lambda: Blur(torch.ones(3, 3), eps=-1.0), r"eps=-1.0 must be a finite number >= 0"),
    (lambda: Blur(torch.ones(3, 3), eps=float("inf")), r"eps=inf must be a finite number"),
    (lambda: Blur(torch.ones(3, 3), padding="reflect"), r"padding='reflect' is not supported; choose one of"),
    (lambda: Blur(torch.eye(3), padding="zero"), r"padding='zero' needs a separable kernel"),
    (lambda: Blur(torch.full((3, 3), float("nan"))), r"kernel has non-finite entries"),
    (lambda: Blur.gaussian(4, 1.0), r"size=4 must be an odd integer"),
    (lambda: Blur.gaussian(3, 0.0), r"sigma=0.0 must be a finite number > 0"),
    (lambda: Blur.box(5).A(torch.zeros(1, 1, 4, 4)), r"kernel has shape \(5, 5\), larger than the image"),
    (lambda: Denoising().A(torch.zeros(3, 4, 4)), r"x has shape \(3, 4, 4\); allowed: an image batch"),
    (lambda: Denoising().A(torch.zeros(1, 3, 4, 4, dtype=torch.long)), r"x must be a floating tensor"),
    (lambda: Denoising().validate_measurement(torch.full((1, 3, 4, 4), float("nan"))), r"y has non-finite entries"),
    (lambda: Colorization().validate_measurement(torch.zeros(1, 3, 4, 4)), r"y has measurement shape"),
]


@pytest.mark.parametrize("call, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_arguments_raise_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_validate_measurement_returns_the_image_shape_and_circular_blur_has_no_real_svd():
    assert SuperResolution(2).validate_measurement(torch.zeros(2, 3, 2, 2)) == (3, 4, 4)
    with pytest.raises(NotImplementedError, match="padding='zero'"):
        Blur.box(3).svd((1, 4, 4))
    assert isinstance(Denoising(), LinearOperator)
