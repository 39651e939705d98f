import torch

import genrep_fast


def test_extension_registers_ops():
    assert genrep_fast._ops.HAS_EXTENSION
    assert hasattr(torch.ops.genrep_fast, "group_sums")
