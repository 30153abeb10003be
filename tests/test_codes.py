import torch

from hsae.models.codes import SparseCodes, fire_counts, l0_per_row, to_dense


def test_fixed_and_ragged_codes_agree_with_dense():
    dense = torch.tensor([[0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    csr = SparseCodes.from_dense(dense)
    assert csr.is_ragged and csr.n_rows == 3
    torch.testing.assert_close(csr.dense(), dense)
    torch.testing.assert_close(l0_per_row(csr), torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(fire_counts(csr), torch.tensor([1, 1, 0, 1]))
    fixed = SparseCodes(torch.tensor([[1, 3], [0, 2], [0, 1]]), torch.tensor([[2.0, -1.0], [0.0, 0.0], [3.0, 0.0]]), 4)
    torch.testing.assert_close(to_dense(fixed), dense)
    torch.testing.assert_close(l0_per_row(fixed), l0_per_row(dense))
    torch.testing.assert_close(fire_counts(fixed), fire_counts(dense))


def _random_codes(seed: int, n: int = 50, m: int = 30) -> tuple[torch.Tensor, list[SparseCodes]]:
    """A dense code with signed values and empty rows, and its fixed-width and CSR forms."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, m, generator=g) * (torch.rand(n, m, generator=g) < 0.15)
    dense[7] = 0
    k = int((dense != 0).sum(1).max())
    values, indices = dense.abs().topk(k, dim=1)
    fixed = SparseCodes(indices, dense.gather(1, indices), m)  # padded with zero-valued slots
    return dense, [fixed, SparseCodes.from_dense(dense)]


def test_csr_cat_and_select_rows_keep_the_rows():
    dense, forms = _random_codes(0)
    for codes in forms:
        csr = codes.csr()
        assert csr.is_ragged and bool((csr.values != 0).all())
        torch.testing.assert_close(csr.dense(), dense)
        both = SparseCodes.cat([codes, csr, SparseCodes.from_dense(dense[:0])])
        torch.testing.assert_close(both.dense(), torch.cat([dense, dense]))
        rows = torch.tensor([5, 0, 7, 5, 49])
        torch.testing.assert_close(codes.select_rows(rows).dense(), dense[rows])
        mask = torch.arange(50) % 3 == 0
        torch.testing.assert_close(codes.select_rows(mask).dense(), dense[mask])


def test_columns_contains_and_torch_sparse_equal_dense_indexing():
    dense, forms = _random_codes(1)
    latents = torch.tensor([3, 29, 3, 0])  # one asked for twice
    rows, cols = torch.randint(0, 50, (400,)), torch.randint(0, 30, (400,))
    for codes in forms:
        torch.testing.assert_close(codes.columns(latents), dense[:, latents])
        assert torch.equal(codes.contains(rows, cols), dense[rows, cols] != 0)
        torch.testing.assert_close(codes.to_torch_sparse().to_dense(), dense)


def test_encode_rows_never_holds_a_dense_code_and_matches_encode():
    from hsae.models import get_family
    from hsae.models.codes import encode_rows

    for arch in ("topk", "relu"):
        fam = get_family(arch)
        cfg = fam.config_class(arch=arch, d_in=8, n_latents=32, k=3)
        model = fam(cfg).eval()
        x = torch.randn(70, 8)
        codes = encode_rows(model, x, batch_size=16)
        assert codes.is_ragged and codes.n_rows == 70
        torch.testing.assert_close(codes.dense(), to_dense(model.encode(x)))
