"""snapfs.crypto: encryption at rest and authenticated snapshot exchange between sites.

Pure functions and small classes, no I/O beyond key files and streams handed in:

    aead      AES-256-GCM blobs (random nonces for data, synthetic nonces for names)
    keys      master secret, derived keys, scrypt/key-file wrapping, passphrase input,
              WrongKey
    sitekeys  site keys, their files, and the authenticated bundle stream format
"""
