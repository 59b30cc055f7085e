"""Linear measurement operators y = A x for restoring images with any trained UNet (issue 22, item 1).

An operator is the forward map A, its pseudo-inverse A⁺ (DDNM, Wang et al. 2022, arXiv:2212.00490, eq. (9)), the
adjoint Aᵀ (the gradient of ‖y − A x̂₀‖² that DPS, arXiv:2209.14687, and ΠGDM take; autograd gives the same) and,
where cheap, an SVD A = U S Vᵀ in the convention of DDRM's `H_functions` (Kawar et al. 2022, arXiv:2201.11793, sec. 4
and its code): `V`, `Vt`, `U`, `Ut`, `singulars`, `add_zeros`.

Shapes: an image batch x is (B, C, H, W) and its measurement y is (B, *measurement_shape((C, H, W))); the spectral
coefficients of the SVD view are flat, (B, n) on the V side with n = C·H·W and (B, m) on the U side, the m entries of
`singulars` matching the first m coefficients of `Vt(x)` (every operator here has r = m: S = [diag(s) 0]). Flattening
is row-major over (C, H, W). Every map is linear and follows its input's dtype and device; an operator's own tensors
(mask, kernel, matrices) are kept in float64 on the host and cast on use, once per dtype and device.

Exact: A A⁺ A = A and A⁺ A A⁺ = A⁺ for every operator but `Blur` with ε > 0, whose Tikhonov-regularised
A⁺_ε = Aᵀ(A Aᵀ + ε I)⁻¹ gives ‖A A⁺_ε A − A‖₂ = max_s s·ε / (s² + ε) ≤ √ε / 2 (s the singular values of A).

This file ships inside saved pipeline folders: it imports only torch and the standard library.
"""

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

ImageShape = Tuple[int, int, int]
BLUR_PADDINGS = ("circular", "zero")
# Singular values (or Fourier multipliers) below RCOND · max are zero for the exact pseudo-inverse (ε = 0), as
# torch.linalg.pinv's default rtol does for float64.
RCOND = 1e-10


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _float64_tensor(name: str, value) -> torch.Tensor:
    """`value` as a float64 host tensor, refused when it is not finite."""
    t = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite entries (nan or inf); allowed: finite values only.")
    return t


def _image_shape(image_shape) -> ImageShape:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(_is_int(d) and d >= 1 for d in shape):
        raise ValueError(f"image_shape={tuple(image_shape)!r} must be three positive integers (C, H, W).")
    return shape


def _pinv_of(s: torch.Tensor, eps: float) -> torch.Tensor:
    """1/s regularised: s / (s² + ε), or the exact Moore–Penrose 1/s (0 where s ≤ RCOND·max s) at ε = 0."""
    a = s.abs()
    if eps > 0:
        return s.conj() / (a**2 + eps)
    keep = a > RCOND * a.max()
    return torch.where(keep, 1 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))


class OperatorSVD:
    """A = U S Vᵀ for one image shape, in DDRM's `H_functions` convention (Kawar et al. 2022, sec. 4, its code).

    U (m × m) and V (n × n) are orthogonal, S = [diag(s) 0] is m × n; `Vt(x)` takes an image batch to its n spectral
    coefficients, the first m of which go with `singulars()`; `U(z)` takes m coefficients to a measurement batch.
    """

    def __init__(
        self,
        image_shape: ImageShape,
        measurement_shape: Tuple[int, ...],
        singulars: torch.Tensor,
        V: Callable[[torch.Tensor], torch.Tensor],
        Vt: Callable[[torch.Tensor], torch.Tensor],
        U: Callable[[torch.Tensor], torch.Tensor],
        Ut: Callable[[torch.Tensor], torch.Tensor],
    ):
        self.image_shape = tuple(image_shape)
        self.measurement_shape = tuple(measurement_shape)
        self._s = singulars
        self.V, self.Vt, self.U, self.Ut = V, Vt, U, Ut

    def singulars(self) -> torch.Tensor:
        """The m singular values s of A (float64, on the host; cast with `.to(x)`), in the order of `Vt`'s first m."""
        return self._s

    def add_zeros(self, z: torch.Tensor) -> torch.Tensor:
        """(B, m) → (B, n): S's zero columns, z followed by n − m zeros."""
        n = math.prod(self.image_shape)
        return F.pad(z, (0, n - z.shape[1]))

    def H(self, x: torch.Tensor) -> torch.Tensor:
        """A x = U S Vᵀ x."""
        s = self._s.to(x)
        return self.U(s * self.Vt(x)[:, : s.shape[0]])

    def Ht(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀ y = V Sᵀ Uᵀ y."""
        return self.V(self.add_zeros(self._s.to(y) * self.Ut(y)))

    def H_pinv(self, y: torch.Tensor) -> torch.Tensor:
        """A⁺ y = V S⁺ Uᵀ y, S⁺ = diag(1/s) on the nonzero s (s ≤ RCOND · max s counts as zero)."""
        return self.V(self.add_zeros(_pinv_of(self._s, 0.0).to(y) * self.Ut(y)))

    def dense(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, s, V) as float64 matrices, m × m, (m,), n × n, built by applying U and V to the identity: for checks."""
        n, m = math.prod(self.image_shape), self._s.shape[0]
        eye_m, eye_n = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
        return self.U(eye_m).reshape(m, m).T, self._s, self.V(eye_n).reshape(n, n).T


class LinearOperator:
    """A linear measurement y = A x of an image batch, with A⁺, Aᵀ and the dense matrix (DDRM/DDNM's degradation)."""

    def measurement_shape(self, image_shape) -> Tuple[int, ...]:
        """The shape of y for one image of shape (C, H, W); raises ValueError when A is not defined on it."""
        raise NotImplementedError

    def image_shape_of(self, measurement_shape) -> ImageShape:
        """The (C, H, W) whose measurement has `measurement_shape`; raises ValueError when there is none."""
        raise NotImplementedError

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """y = A x, x of shape (B, C, H, W), y of shape (B, *measurement_shape)."""
        return self._A(x, self._check(x, "x", image=True))

    def AT(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀ y, the adjoint: ⟨A x, y⟩ = ⟨x, Aᵀ y⟩ (the gradient DPS and ΠGDM take)."""
        return self._AT(y, self._check(y, "y", image=False))

    def A_pinv(self, y: torch.Tensor) -> torch.Tensor:
        """A⁺ y, the Moore–Penrose pseudo-inverse (DDNM eq. (9)): A A⁺ A = A, A⁺ A A⁺ = A⁺."""
        return self._A_pinv(y, self._check(y, "y", image=False))

    def svd(self, image_shape) -> OperatorSVD:
        """A = U S Vᵀ for images of shape (C, H, W), as DDRM's H_functions (where cheap)."""
        raise NotImplementedError(f"{type(self).__name__} has no cheap SVD; use A, AT and A_pinv.")

    def matrix(self, image_shape) -> torch.Tensor:
        """The dense m × n float64 matrix of A, built by applying A to the identity basis: for checks on small images."""
        shape = _image_shape(image_shape)
        n = math.prod(shape)
        return self.A(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, -1).T

    def validate_measurement(self, y: torch.Tensor) -> ImageShape:
        """Check y at a pipeline's door (its shape, and finiteness: one host read); return the image shape (C, H, W)."""
        image_shape = self._check(y, "y", image=False)
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y has non-finite entries (nan or inf); allowed: a finite measurement.")
        return image_shape

    def _check(self, t, name: str, image: bool) -> ImageShape:
        """Shape checks only (no host read): an image batch (B, C, H, W) or a measurement batch (B, *shape)."""
        if not torch.is_tensor(t) or not t.is_floating_point() or t.ndim < 2:
            got = f"shape {tuple(t.shape)}, dtype {t.dtype}" if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor with a batch dimension first; got {got}.")
        if image:
            if t.ndim != 4:
                raise ValueError(f"x has shape {tuple(t.shape)}; allowed: an image batch (B, C, H, W).")
            self.measurement_shape(tuple(t.shape[1:]))
            return tuple(t.shape[1:])
        return self.image_shape_of(tuple(t.shape[1:]))

    def _A(self, x: torch.Tensor, image_shape: ImageShape) -> torch.Tensor:
        raise NotImplementedError

    def _AT(self, y: torch.Tensor, image_shape: ImageShape) -> torch.Tensor:
        raise NotImplementedError

    def _A_pinv(self, y: torch.Tensor, image_shape: ImageShape) -> torch.Tensor:
        raise NotImplementedError


class _Cache:
    """Host tensors made once, then cast once per (dtype, device) of the input they meet."""

    def __init__(self):
        self._store: Dict[tuple, torch.Tensor] = {}

    def get(self, key, make: Callable[[], torch.Tensor], like: torch.Tensor, dtype=None) -> torch.Tensor:
        host = self._store.get(("host", key))
        if host is None:
            host = self._store[("host", key)] = make()
        if dtype is None and host.is_complex():
            dtype = torch.complex128 if like.dtype == torch.float64 else torch.complex64
        dtype = dtype or like.dtype
        if (key, dtype, like.device) not in self._store:
            self._store[(key, dtype, like.device)] = host.to(device=like.device, dtype=dtype)
        return self._store[(key, dtype, like.device)]


class Denoising(LinearOperator):
    """A = I: y = x + noise (DDRM sec. 4, denoising): A⁺ = Aᵀ = I, s = 1."""

    def measurement_shape(self, image_shape) -> Tuple[int, ...]:
        return _image_shape(image_shape)

    def image_shape_of(self, measurement_shape) -> ImageShape:
        return _image_shape(measurement_shape)

    def _A(self, x, image_shape):
        return x

    _AT = _A_pinv = _A

    def svd(self, image_shape) -> OperatorSVD:
        shape = _image_shape(image_shape)
        n = math.prod(shape)

        def flat(t):
            return t.reshape(t.shape[0], n)

        def unflat(z):
            return z.reshape(z.shape[0], *shape)

        return OperatorSVD(shape, shape, torch.ones(n, dtype=torch.float64), unflat, flat, unflat, flat)


class Inpainting(LinearOperator):
    """y = the observed pixels of x, a row selection (DDRM sec. 4, inpainting): A Aᵀ = I, so A⁺ = Aᵀ, s = 1.

    Args:
        mask (`torch.Tensor`): 1 = observed, 0 = missing; shape (H, W) (the same for every channel) or (1 or C, H, W).
            y is flat, (B, m), the observed entries of x in row-major (C, H, W) order; A⁺ y puts them back and
            leaves zeros elsewhere.
    """

    def __init__(self, mask):
        m = _float64_tensor("mask", mask)
        if m.ndim not in (2, 3):
            raise ValueError(f"mask has shape {tuple(m.shape)}; allowed: (H, W) or (1 or C, H, W).")
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask must be binary (1 = observed, 0 = missing); got values other than 0 and 1.")
        if not bool(m.any()):
            raise ValueError("mask observes no pixel; allowed: a mask with at least one 1.")
        self.mask = m if m.ndim == 3 else m[None]
        self._count = int(self.mask.sum())  # observed entries per image when C matches the mask's channels
        self._cache = _Cache()

    def measurement_shape(self, image_shape) -> Tuple[int, ...]:
        c, h, w = _image_shape(image_shape)
        mc = self.mask.shape[0]
        if self.mask.shape[1:] != (h, w) or mc not in (1, c):
            raise ValueError(
                f"mask has shape {tuple(self.mask.shape)} but the image is (C, H, W) = {(c, h, w)}; allowed: a "
                f"mask of shape ({h}, {w}) or (1 or {c}, {h}, {w})."
            )
        return (self._count * (c if mc == 1 else 1),)

    def image_shape_of(self, measurement_shape) -> ImageShape:
        mc, h, w = self.mask.shape
        shape = tuple(measurement_shape)
        if len(shape) == 1 and mc == 1 and shape[0] % self._count == 0 and shape[0] > 0:
            return (shape[0] // self._count, h, w)
        if len(shape) == 1 and mc > 1 and shape[0] == self._count:
            return (mc, h, w)
        raise ValueError(
            f"y has measurement shape {shape}; allowed: (m,) with m the observed entries, {self._count} per "
            f"{'channel' if mc == 1 else 'image'}."
        )

    def _indices(self, image_shape, like):
        def make():
            full = self.mask.expand(image_shape).reshape(-1)
            return torch.cat([full.nonzero()[:, 0], (full == 0).nonzero()[:, 0]])

        order = self._cache.get(("order", image_shape), make, like, dtype=torch.long)
        return order[: self.measurement_shape(image_shape)[0]], order

    def _A(self, x, image_shape):
        kept, _ = self._indices(image_shape, x)
        return x.reshape(x.shape[0], -1)[:, kept]

    def _AT(self, y, image_shape):
        kept, _ = self._indices(image_shape, y)
        out = y.new_zeros(y.shape[0], math.prod(image_shape))
        out[:, kept] = y
        return out.reshape(y.shape[0], *image_shape)

    _A_pinv = _AT

    def svd(self, image_shape) -> OperatorSVD:
        shape = _image_shape(image_shape)
        (m,) = self.measurement_shape(shape)

        def Vt(x):  # the observed entries first, then the missing ones
            return x.reshape(x.shape[0], -1)[:, self._indices(shape, x)[1]]

        def V(z):
            out = torch.empty_like(z)
            out[:, self._indices(shape, z)[1]] = z
            return out.reshape(z.shape[0], *shape)

        def identity(t):
            return t.reshape(t.shape[0], m)

        return OperatorSVD(shape, (m,), torch.ones(m, dtype=torch.float64), V, Vt, identity, identity)


class Colorization(LinearOperator):
    """y = (R + G + B) / 3, one gray channel (DDRM sec. 4, colorization): A⁺ y = y in all three channels, s = 1/√3.

    A row is (1/3, 1/3, 1/3) per pixel, so A Aᵀ = 1/3 and A⁺ = Aᵀ (A Aᵀ)⁻¹ = 3 Aᵀ replicates y; Aᵀ y = y/3 ×3.
    """

    # Per pixel, an orthonormal basis of R³ whose first vector (1, 1, 1)/√3 is A's row direction.
    _BASIS = torch.tensor(
        [
            [1 / math.sqrt(3)] * 3,
            [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
            [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)],
        ],
        dtype=torch.float64,
    )

    def __init__(self):
        self._cache = _Cache()

    def measurement_shape(self, image_shape) -> Tuple[int, ...]:
        c, h, w = _image_shape(image_shape)
        if c != 3:
            raise ValueError(f"the image has C={c} channels; colorization needs C=3 (RGB).")
        return (1, h, w)

    def image_shape_of(self, measurement_shape) -> ImageShape:
        shape = tuple(measurement_shape)
        if len(shape) != 3 or shape[0] != 1:
            raise ValueError(f"y has measurement shape {shape}; allowed: one gray channel (1, H, W).")
        return (3, shape[1], shape[2])

    def _A(self, x, image_shape):
        return x.mean(dim=1, keepdim=True)

    def _AT(self, y, image_shape):
        return (y / 3).repeat(1, 3, 1, 1)

    def _A_pinv(self, y, image_shape):
        return y.repeat(1, 3, 1, 1)

    def svd(self, image_shape) -> OperatorSVD:
        shape = _image_shape(image_shape)
        _, h, w = shape
        self.measurement_shape(shape)

        def Vt(x):  # the coefficient along (1, 1, 1)/√3 for every pixel first
            return torch.einsum("kc,bchw->bkhw", self._cache.get("basis", lambda: self._BASIS, x), x).flatten(1)

        def V(z):
            basis = self._cache.get("basis", lambda: self._BASIS, z)
            return torch.einsum("kc,bkhw->bchw", basis, z.reshape(z.shape[0], 3, h, w))

        singulars = torch.full((h * w,), 1 / math.sqrt(3), dtype=torch.float64)
        return OperatorSVD(
            shape, (1, h, w), singulars, V, Vt, lambda z: z.reshape(z.shape[0], 1, h, w), lambda y: y.flatten(1)
        )


class SuperResolution(LinearOperator):
    """y = the mean of each factor × factor block (DDRM sec. 4, super-resolution): A⁺ = nearest upsampling, s = 1/k.

    A row holds 1/k² on one k × k block, so A Aᵀ = I/k² and A⁺ = k² Aᵀ copies each y into its block (nearest
    upsampling; bilinear is not A⁺). Per block, an orthonormal basis whose first vector is the constant 1/k (the 2-D
    DCT-II) gives the SVD: one singular value 1/k per block and channel.

    Args:
        factor (`int`): k ≥ 1, which must divide H and W.
    """

    def __init__(self, factor: int):
        if not _is_int(factor) or factor < 1:
            raise ValueError(f"factor={factor!r} must be an integer >= 1.")
        self.factor = factor
        self._cache = _Cache()

    def measurement_shape(self, image_shape) -> Tuple[int, ...]:
        c, h, w = _image_shape(image_shape)
        k = self.factor
        if h % k or w % k:
            raise ValueError(
                f"factor={k} does not divide the image size (H, W) = ({h}, {w}); allowed: a factor dividing both."
            )
        return (c, h // k, w // k)

    def image_shape_of(self, measurement_shape) -> ImageShape:
        c, h, w = _image_shape(measurement_shape)
        return (c, h * self.factor, w * self.factor)

    def _A(self, x, image_shape):
        b, (c, h, w), k = x.shape[0], image_shape, self.factor
        return x.reshape(b, c, h // k, k, w // k, k).mean(dim=(3, 5))

    def _A_pinv(self, y, image_shape):
        k = self.factor
        return y.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)

    def _AT(self, y, image_shape):
        return self._A_pinv(y, image_shape) / self.factor**2

    def _block_basis(self) -> torch.Tensor:
        """kron(D, D), D the orthonormal k-point DCT-II: row 0 is the constant 1/k over a row-major k × k block."""
        k = self.factor
        i, j = torch.arange(k, dtype=torch.float64)[:, None], torch.arange(k, dtype=torch.float64)[None]
        D = math.sqrt(2 / k) * torch.cos(math.pi * (2 * j + 1) * i / (2 * k))
        D[0] = 1 / math.sqrt(k)
        return torch.kron(D, D)

    def svd(self, image_shape) -> OperatorSVD:
        shape = _image_shape(image_shape)
        c, h, w = self.measurement_shape(shape)
        k = self.factor

        def Vt(x):  # (B, C, h, w, k²) block coefficients, the DC term of every block and channel first
            blocks = x.reshape(x.shape[0], c, h, k, w, k).permute(0, 1, 2, 4, 3, 5).reshape(x.shape[0], c, h, w, k * k)
            coeffs = blocks @ self._cache.get("basis", self._block_basis, x).T
            return coeffs.permute(0, 4, 1, 2, 3).flatten(1)

        def V(z):
            coeffs = z.reshape(z.shape[0], k * k, c, h, w).permute(0, 2, 3, 4, 1)
            blocks = (coeffs @ self._cache.get("basis", self._block_basis, z)).reshape(z.shape[0], c, h, w, k, k)
            return blocks.permute(0, 1, 2, 4, 3, 5).reshape(z.shape[0], *shape)

        singulars = torch.full((c * h * w,), 1 / k, dtype=torch.float64)
        return OperatorSVD(
            shape, (c, h, w), singulars, V, Vt, lambda z: z.reshape(z.shape[0], c, h, w), lambda y: y.flatten(1)
        )


class Blur(LinearOperator):
    """y = k ⋆ x per channel, a same-size cross-correlation as F.conv2d (DDRM sec. 4, deblurring), centred kernel.

    padding="circular": A is diagonal in the 2-D Fourier basis, A = F⁻¹ diag(K) F; Aᵀ has conj(K), and
    A⁺_ε = F⁻¹ diag(conj(K) / (|K|² + ε)) F. padding="zero" (zeros outside the image) needs a separable kernel
    k = a bᵀ: A = A_a ⊗ A_b with banded H × H and W × W matrices, whose SVDs give A's (DDRM's deblurring) and
    A⁺_ε = V diag(s / (s² + ε)) Uᵀ. ε > 0 is only approximately A⁺: ‖A A⁺_ε A − A‖₂ ≤ √ε / 2; ε = 0 is the exact
    pseudo-inverse (multipliers below RCOND · max are zero).

    Args:
        kernel (`torch.Tensor`): (kh, kw), both odd, finite.
        eps (`float`): ε ≥ 0, the Tikhonov regulariser of A⁺.
        padding (`str`): one of BLUR_PADDINGS.
    """

    def __init__(self, kernel, eps: float = 0.0, padding: str = "circular"):
        k = _float64_tensor("kernel", kernel)
        if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
            raise ValueError(f"kernel has shape {tuple(k.shape)}; allowed: a 2-D kernel (kh, kw) with odd sizes.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps={eps!r} must be a finite number >= 0.")
        if padding not in BLUR_PADDINGS:
            raise ValueError(f"padding={padding!r} is not supported; choose one of {BLUR_PADDINGS}.")
        self.kernel, self.eps, self.padding = k, float(eps), padding
        if padding == "zero":
            u, s, vh = torch.linalg.svd(k)
            if s.shape[0] > 1 and s[1] > RCOND * s[0]:
                raise ValueError(
                    f"padding='zero' needs a separable kernel a bᵀ (rank 1); this kernel {tuple(k.shape)} has "
                    f"singular values {s.tolist()}. Use padding='circular' for any kernel."
                )
            self._a, self._b = u[:, 0] * s[0].sqrt(), vh[0] * s[0].sqrt()  # k = a bᵀ
        self._cache = _Cache()

    @classmethod
    def gaussian(cls, size: int, sigma: float, eps: float = 0.0, padding: str = "circular") -> "Blur":
        """The normalised Gaussian kernel exp(−(i² + j²) / (2σ²)) on a size × size grid centred at 0."""
        if not _is_int(size) or size < 1 or size % 2 == 0:
            raise ValueError(f"size={size!r} must be an odd integer >= 1.")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma={sigma!r} must be a finite number > 0.")
        i = torch.arange(size, dtype=torch.float64) - size // 2
        g = torch.exp(-(i**2) / (2 * sigma**2))
        g = g / g.sum()
        return cls(torch.outer(g, g), eps=eps, padding=padding)

    @classmethod
    def box(cls, size: int, eps: float = 0.0, padding: str = "circular") -> "Blur":
        """The box kernel 1/size² on a size × size grid."""
        if not _is_int(size) or size < 1 or size % 2 == 0:
            raise ValueError(f"size={size!r} must be an odd integer >= 1.")
        return cls(torch.full((size, size), 1 / size**2, dtype=torch.float64), eps=eps, padding=padding)

    def measurement_shape(self, image_shape) -> Tuple[int, ...]:
        c, h, w = _image_shape(image_shape)
        kh, kw = self.kernel.shape
        if kh > h or kw > w:
            raise ValueError(
                f"kernel has shape {(kh, kw)}, larger than the image (H, W) = ({h}, {w}); allowed: kh <= H, kw <= W."
            )
        return (c, h, w)

    def image_shape_of(self, measurement_shape) -> ImageShape:
        shape = _image_shape(measurement_shape)
        self.measurement_shape(shape)
        return shape

    # --- padding="circular": the Fourier multipliers -------------------------------------------------------------
    def _multiplier(self, hw) -> torch.Tensor:
        """K with F(k ⋆ x) = K · F(x): k rolled so its centre sits at (0, 0), then K = conj(F(k)) (correlation)."""
        h, w = hw
        kh, kw = self.kernel.shape
        full = torch.zeros(h, w, dtype=torch.float64)
        full[:kh, :kw] = self.kernel
        return torch.fft.fft2(torch.roll(full, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1))).conj()

    def _fourier(self, t, which: str):
        hw = tuple(t.shape[-2:])
        K = self._cache.get(("K", hw), lambda: self._multiplier(hw), t)
        m = {"A": K, "AT": K.conj(), "pinv": _pinv_of(K, self.eps)}[which]
        return torch.fft.ifft2(m * torch.fft.fft2(t)).real

    # --- padding="zero": A = A_a ⊗ A_b and the SVDs of the two factors ---------------------------------------------
    def _band(self, v: torch.Tensor, size: int) -> torch.Tensor:
        """The size × size matrix of the zero-padded 1-D correlation with v: M[i, i'] = v[i' − i + len(v)//2]."""
        i = torch.arange(size)
        offset = i[None] - i[:, None] + v.shape[0] // 2
        inside = (offset >= 0) & (offset < v.shape[0])
        return torch.where(inside, v[offset.clamp(0, v.shape[0] - 1)], torch.zeros((), dtype=torch.float64))

    def _factors(self, hw, like):
        """(A_a, U_a, s_a, V_a, A_b, U_b, s_b, V_b) on like's dtype and device."""
        out = []
        for v, size, tag in ((self._a, hw[0], "a"), (self._b, hw[1], "b")):
            M = self._band(v, size)
            U, s, Vh = torch.linalg.svd(M)
            for name, t in (("M", M), ("U", U), ("s", s), ("V", Vh.T)):
                out.append(self._cache.get((tag, name, size), lambda t=t: t, like))
        return out

    def _zero(self, t, which: str):
        Ma, Ua, sa, Va, Mb, Ub, sb, Vb = self._factors(tuple(t.shape[-2:]), t)
        if which == "A":
            return Ma @ t @ Mb.T  # (A_a ⊗ A_b) vec(X) = vec(A_a X A_bᵀ)
        if which == "AT":
            return Ma.T @ t @ Mb
        scale = _pinv_of(torch.outer(sa, sb), self.eps)
        return Va @ ((Ua.T @ t @ Ub) * scale) @ Vb.T  # V diag(s / (s² + ε)) Uᵀ

    def _A(self, x, image_shape):
        return self._fourier(x, "A") if self.padding == "circular" else self._zero(x, "A")

    def _AT(self, y, image_shape):
        return self._fourier(y, "AT") if self.padding == "circular" else self._zero(y, "AT")

    def _A_pinv(self, y, image_shape):
        return self._fourier(y, "pinv") if self.padding == "circular" else self._zero(y, "pinv")

    def svd(self, image_shape) -> OperatorSVD:
        """For padding='zero' only: s = s_a ⊗ s_b per channel (DDRM's separable deblurring), in (C, H, W) order."""
        shape = _image_shape(image_shape)
        self.measurement_shape(shape)
        if self.padding != "zero":
            raise NotImplementedError("Blur(padding='circular') has a complex (Fourier) SVD only; use padding='zero'.")
        c, h, w = shape

        def factors(t):
            _, Ua, _, Va, _, Ub, _, Vb = self._factors((h, w), t)
            return Ua, Va, Ub, Vb

        def Vt(x):
            _, Va, _, Vb = factors(x)
            return (Va.T @ x @ Vb).flatten(1)

        def V(z):
            _, Va, _, Vb = factors(z)
            return Va @ z.reshape(z.shape[0], c, h, w) @ Vb.T

        def U(z):
            Ua, _, Ub, _ = factors(z)
            return Ua @ z.reshape(z.shape[0], c, h, w) @ Ub.T

        def Ut(y):
            Ua, _, Ub, _ = factors(y)
            return (Ua.T @ y @ Ub).flatten(1)

        sa = torch.linalg.svdvals(self._band(self._a, h))
        sb = torch.linalg.svdvals(self._band(self._b, w))
        return OperatorSVD(shape, shape, torch.outer(sa, sb).repeat(c, 1, 1).flatten(), V, Vt, U, Ut)


class RandomProjection(LinearOperator):
    """Compressed sensing y = P x, P a seeded Gaussian (m × n) / √m (DDRM sec. 4's general H), dense.

    A⁺ = torch.linalg.pinv(P) and the SVD (torch.linalg.svd, full V: n × n) are computed once, for the one image
    shape P is drawn for: small images only (memory n²).

    Args:
        m (`int`): the number of measurements, 1 ≤ m ≤ n = C·H·W.
        image_shape (`Tuple[int, int, int]`): (C, H, W), which fixes n.
        seed (`int`): the seed of P (a CPU torch.Generator, float64).
    """

    def __init__(self, m: int, image_shape, seed: int = 0):
        self.image_shape = _image_shape(image_shape)
        n = math.prod(self.image_shape)
        if not _is_int(m) or not 1 <= m <= n:
            raise ValueError(f"m={m!r} must be an integer with 1 <= m <= n = C·H·W = {n}.")
        if not _is_int(seed):
            raise ValueError(f"seed={seed!r} must be an integer.")
        self.m, self.seed = m, seed
        generator = torch.Generator().manual_seed(seed)
        self.P = torch.randn(m, n, generator=generator, dtype=torch.float64) / math.sqrt(m)
        self.P_pinv = torch.linalg.pinv(self.P)
        self._svd = None
        self._cache = _Cache()

    def measurement_shape(self, image_shape) -> Tuple[int, ...]:
        shape = _image_shape(image_shape)
        if shape != self.image_shape:
            raise ValueError(
                f"image_shape={shape} does not match the {self.image_shape} that P was drawn for; allowed: "
                f"{self.image_shape}."
            )
        return (self.m,)

    def image_shape_of(self, measurement_shape) -> ImageShape:
        if tuple(measurement_shape) != (self.m,):
            raise ValueError(f"y has measurement shape {tuple(measurement_shape)}; allowed: ({self.m},).")
        return self.image_shape

    def _A(self, x, image_shape):
        return x.flatten(1) @ self._cache.get("P", lambda: self.P, x).T

    def _AT(self, y, image_shape):
        return (y @ self._cache.get("P", lambda: self.P, y)).reshape(y.shape[0], *self.image_shape)

    def _A_pinv(self, y, image_shape):
        return (y @ self._cache.get("P_pinv", lambda: self.P_pinv, y).T).reshape(y.shape[0], *self.image_shape)

    def svd(self, image_shape) -> OperatorSVD:
        self.measurement_shape(image_shape)
        if self._svd is None:
            self._svd = torch.linalg.svd(self.P, full_matrices=True)  # U (m × m), s (m,), Vᵀ (n × n)
        U_, s, Vh = self._svd
        shape = self.image_shape

        def Vt(x):
            return x.flatten(1) @ self._cache.get("Vh", lambda: Vh, x).T

        def V(z):
            return (z @ self._cache.get("Vh", lambda: Vh, z)).reshape(z.shape[0], *shape)

        def U(z):
            return z @ self._cache.get("U", lambda: U_, z).T

        def Ut(y):
            return y @ self._cache.get("U", lambda: U_, y)

        return OperatorSVD(shape, (self.m,), s, V, Vt, U, Ut)
