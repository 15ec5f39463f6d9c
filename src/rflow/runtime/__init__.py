"""Running models on the hardware at hand: block-streaming offload (:mod:`.offload`, :mod:`.streaming`)
and timing against the op floor (``rflow bench``)."""
