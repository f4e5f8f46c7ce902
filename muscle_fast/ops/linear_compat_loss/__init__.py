"""fused_linear_compat_loss: the compat loss from hidden states and lm_head weights, token-chunked."""
