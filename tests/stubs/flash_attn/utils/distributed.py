def all_gather(*a, **k):
    raise NotImplementedError("flash_attn is a test stand-in here")
