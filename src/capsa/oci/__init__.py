"""OCI images: references, a registry client, a content-addressed store, safe unpacking and
root file system images for sandboxes."""
