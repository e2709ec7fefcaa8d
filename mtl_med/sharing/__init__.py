"""mtl_med.sharing"""
