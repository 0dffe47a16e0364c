"""Identity and access: users, passwords, tokens, sessions and the one policy point."""
