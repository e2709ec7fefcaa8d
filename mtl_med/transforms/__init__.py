"""mtl_med.transforms"""
