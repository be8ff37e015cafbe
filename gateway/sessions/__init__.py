"""Session state: sealing, chunking and storage of session cookies."""
