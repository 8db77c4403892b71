"""`distillgate demo`: the whole loop on CLINC150 traffic, measured."""
