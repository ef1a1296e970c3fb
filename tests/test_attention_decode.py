

class CacheAttention(torch.nn.Module):
    """The generator's decode step: this step's K/V row written over the cache row at `pos`
    (`where(is_new, k, cache)`), or the past cache and the new row concatenated."""

    def __init__(self, concat: bool):
        super().__init__()
        self.concat = concat

    def forward(self, q, k_cache, v_cache, k, v, pos):
        if self.concat:
            k_all, v_all = torch.cat((k_cache, k), dim=2), torch.cat((v_cache, v), dim=2)
        else:
            is_new = torch.arange(k_cache.shape[2]).view(k_cache.shape[2], 1) == pos
            k_all, v_all = torch.where(is_new, k, k_cache), torch.where(is_new, v, v_cache)
        key_index = torch.arange(k_all.shape[2]).view(1, k_all.shape[2])
        scores = (q @ k_all.transpose(-2, -1) / 8.0).masked_fill(key_index > pos, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v_all


@pytest.mark.parametrize("concat", [False, True])
def test_rows_chosen_per_key_from_cache_or_new_row_match_eager(tmp_path, monkeypatch, concat):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    q, k_cache, v_cache, pos = _inputs(2, 2, 24, 32, 24 if concat else 13)
    k, v = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
    module, args = CacheAttention(concat), (q, k_cache, v_cache, k, v, pos)
    compiled = fusec.compile(module, args)
    attention = _attention_source(compiled)
    assert re.search(r"s = \(row_dot\(.*\) if .* else row_dot\(", attention), attention
    assert re.search(r"\(row_axpy\(.*\) if .* else row_axpy\(", attention), attention
    torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-5)
