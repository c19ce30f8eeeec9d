"""What reads a whole study: the HTML report (html) and `histotransfer verify` (verify)."""
