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
