"""The reference training loop and the GPT model it trains."""
