


def forward(self, x, t, y):
    x_embedder_proj = self.x_embedder.proj(x);  x = None
    flatten = x_embedder_proj.flatten(2);  x_embedder_proj = None
    transpose = flatten.transpose(1, 2);  flatten = None
    pos_embed = self.pos_embed
    add = transpose + pos_embed;  transpose = pos_embed = None
    getattr_1 = t.device
    arange = torch.arange(128, dtype = torch.float32, device = getattr_1);  getattr_1 = None
    mul = -9.210340371976184 * arange;  arange = None
    truediv = mul / 128;  mul = None
    exp = torch.exp(truediv);  truediv = None
    getitem = t[(slice(None, None, None), None)];  t = None
    float_1 = getitem.float();  getitem = None
    getitem_1 = exp[None];  exp = None
    mul_1 = float_1 * getitem_1;  float_1 = getitem_1 = None
    cos = torch.cos(mul_1)
    sin = torch.sin(mul_1);  mul_1 = None
    cat = torch.cat([cos, sin], dim = -1);  cos = sin = None
    t_embedder_mlp_0 = getattr(self.t_embedder.mlp, "0")(cat);  cat = None
    t_embedder_mlp_1 = getattr(self.t_embedder.mlp, "1")(t_embedder_mlp_0);  t_embedder_mlp_0 = None
    t_embedder_mlp_2 = getattr(self.t_embedder.mlp, "2")(t_embedder_mlp_1);  t_embedder_mlp_1 = None
    y_embedder_embedding_table = self.y_embedder.embedding_table(y);  y = None
    add_1 = t_embedder_mlp_2 + y_embedder_embedding_table;  t_embedder_mlp_2 = y_embedder_embedding_table = None
    blocks_0_ada_ln_modulation_0 = getattr(getattr(self.blocks, "0").adaLN_modulation, "0")(add_1)
    blocks_0_ada_ln_modulation_1 = getattr(getattr(self.blocks, "0").adaLN_modulation, "1")(blocks_0_ada_ln_modulation_0);  blocks_0_ada_ln_modulation_0 = None
    chunk = blocks_0_ada_ln_modulation_1.chunk(6, dim = 1);  blocks_0_ada_ln_modulation_1 = None
    getitem_2 = chunk[0]
    getitem_3 = chunk[1]
    getitem_4 = chunk[2]
    getitem_5 = chunk[3]
    getitem_6 = chunk[4]
    getitem_7 = chunk[5];  chunk = None
    unsqueeze = getitem_4.unsqueeze(1);  getitem_4 = None
    blocks_0_norm1 = getattr(self.blocks, "0").norm1(add)
    unsqueeze_1 = getitem_3.unsqueeze(1);  getitem_3 = None
    add_2 = 1 + unsqueeze_1;  unsqueeze_1 = None
    mul_2 = blocks_0_norm1 * add_2;  blocks_0_norm1 = add_2 = None
    unsqueeze_2 = getitem_2.unsqueeze(1);  getitem_2 = None
    add_3 = mul_2 + unsqueeze_2;  mul_2 = unsqueeze_2 = None
    blocks_0_attn = getattr(self.blocks, "0").attn(add_3);  add_3 = None
    mul_3 = unsqueeze * blocks_0_attn;  unsqueeze = blocks_0_attn = None
    add_4 = add + mul_3;  add = mul_3 = None
    unsqueeze_3 = getitem_7.unsqueeze(1);  getitem_7 = None
    blocks_0_norm2 = getattr(self.blocks, "0").norm2(add_4)
    unsqueeze_4 = getitem_6.unsqueeze(1);  getitem_6 = None
    add_5 = 1 + unsqueeze_4;  unsqueeze_4 = None
    mul_4 = blocks_0_norm2 * add_5;  blocks_0_norm2 = add_5 = None
    unsqueeze_5 = getitem_5.unsqueeze(1);  getitem_5 = None
    add_6 = mul_4 + unsqueeze_5;  mul_4 = unsqueeze_5 = None
    flatten_1 = add_6.flatten(0, -2)
    blocks_0_moe_ep_router = getattr(self.blocks, "0").moe.ep_router(flatten_1)
    getitem_30 = blocks_0_moe_ep_router[0]
    getitem_31 = blocks_0_moe_ep_router[1];  blocks_0_moe_ep_router = None
    permute = moedit_runtime_expert_ops_permute(flatten_1, getitem_30, 2, 4);  getitem_30 = None
    getitem_32 = permute[0]
    getitem_33 = permute[1]
    getitem_34 = permute[2];  permute = None
    blocks_0_moe_shared_experts = getattr(self.blocks, "0").moe.shared_experts(flatten_1);  flatten_1 = None
    blocks_0_moe_ep_stale_counts = getattr(self.blocks, "0").moe.ep_stale_counts(getitem_34)
    blocks_0_moe_ep_read_ring_dispatch = getattr(self.blocks, "0").moe.ep_read_ring_dispatch()
    getattr_4 = blocks_0_moe_ep_read_ring_dispatch.pending
    getattr_5 = blocks_0_moe_ep_read_ring_dispatch.order
    getattr_6 = blocks_0_moe_ep_read_ring_dispatch.send_counts
    getattr_7 = blocks_0_moe_ep_read_ring_dispatch.recv_counts;  blocks_0_moe_ep_read_ring_dispatch = None
    wait_8 = moedit_runtime_comm_wait(getattr_4);  getattr_4 = None
    blocks_1_moe_ep_experts_1 = getattr(self.blocks, "1").moe.ep_experts(wait_8, getattr_7);  wait_8 = None
    splits_8 = moedit_runtime_expert_ops_splits(getattr_6)
    splits_9 = moedit_runtime_expert_ops_splits(getattr_7)
    blocks_1_moe_ep_stale_combine = getattr(self.blocks, "1").moe.ep_stale_combine(blocks_1_moe_ep_experts_1, splits_9, splits_8);  blocks_1_moe_ep_experts_1 = splits_9 = splits_8 = None
    in_flight = moedit_runtime_cache_in_flight(blocks_1_moe_ep_stale_combine, getattr_5, getattr_6, getattr_7);  blocks_1_moe_ep_stale_combine = getattr_5 = getattr_6 = getattr_7 = None
    blocks_0_moe_ep_read_layer0_combine = getattr(self.blocks, "0").moe.ep_read_layer0_combine()
    getattr_8 = blocks_0_moe_ep_read_layer0_combine.pending
    getattr_9 = blocks_0_moe_ep_read_layer0_combine.order
    getattr_10 = blocks_0_moe_ep_read_layer0_combine.send_counts;  getattr_10 = None
    getattr_11 = blocks_0_moe_ep_read_layer0_combine.recv_counts;  blocks_0_moe_ep_read_layer0_combine = getattr_11 = None
    wait_9 = moedit_runtime_comm_wait(getattr_8);  getattr_8 = None
    blocks_0_moe_ep_slot_cache = getattr(self.blocks, "0").moe.ep_slot_cache(wait_9, getattr_9, getitem_31);  wait_9 = getattr_9 = getitem_31 = None
    wait_10 = moedit_runtime_comm_wait(blocks_0_moe_ep_stale_counts);  blocks_0_moe_ep_stale_counts = None
    splits_10 = moedit_runtime_expert_ops_splits(getitem_34)
    splits_11 = moedit_runtime_expert_ops_splits(wait_10)
    blocks_0_moe_ep_stale_dispatch = getattr(self.blocks, "0").moe.ep_stale_dispatch(getitem_32, splits_10, splits_11);  getitem_32 = splits_10 = splits_11 = None
    in_flight_1 = moedit_runtime_cache_in_flight(blocks_0_moe_ep_stale_dispatch, getitem_33, getitem_34, wait_10);  blocks_0_moe_ep_stale_dispatch = getitem_33 = getitem_34 = wait_10 = None
    blocks_0_moe_ep_merge = getattr(self.blocks, "0").moe.ep_merge(blocks_0_moe_ep_slot_cache, blocks_0_moe_shared_experts);  blocks_0_moe_ep_slot_cache = blocks_0_moe_shared_experts = None
    reshape_as = blocks_0_moe_ep_merge.reshape_as(add_6);  blocks_0_moe_ep_merge = add_6 = None
    mul_5 = unsqueeze_3 * reshape_as;  unsqueeze_3 = reshape_as = None
    add_7 = add_4 + mul_5;  add_4 = mul_5 = None
    blocks_1_ada_ln_modulation_0 = getattr(getattr(self.blocks, "1").adaLN_modulation, "0")(add_1)
    blocks_1_ada_ln_modulation_1 = getattr(getattr(self.blocks, "1").adaLN_modulation, "1")(blocks_1_ada_ln_modulation_0);  blocks_1_ada_ln_modulation_0 = None
    chunk_1 = blocks_1_ada_ln_modulation_1.chunk(6, dim = 1);  blocks_1_ada_ln_modulation_1 = None
    getitem_8 = chunk_1[0]
    getitem_9 = chunk_1[1]
    getitem_10 = chunk_1[2]
    getitem_11 = chunk_1[3]
    getitem_12 = chunk_1[4]
    getitem_13 = chunk_1[5];  chunk_1 = None
    unsqueeze_6 = getitem_10.unsqueeze(1);  getitem_10 = None
    blocks_1_norm1 = getattr(self.blocks, "1").norm1(add_7)
    unsqueeze_7 = getitem_9.unsqueeze(1);  getitem_9 = None
    add_8 = 1 + unsqueeze_7;  unsqueeze_7 = None
    mul_6 = blocks_1_norm1 * add_8;  blocks_1_norm1 = add_8 = None
    unsqueeze_8 = getitem_8.unsqueeze(1);  getitem_8 = None
    add_9 = mul_6 + unsqueeze_8;  mul_6 = unsqueeze_8 = None
    blocks_1_attn = getattr(self.blocks, "1").attn(add_9);  add_9 = None
    mul_7 = unsqueeze_6 * blocks_1_attn;  unsqueeze_6 = blocks_1_attn = None
    add_10 = add_7 + mul_7;  add_7 = mul_7 = None
    unsqueeze_9 = getitem_13.unsqueeze(1);  getitem_13 = None
    blocks_1_norm2 = getattr(self.blocks, "1").norm2(add_10)
    unsqueeze_10 = getitem_12.unsqueeze(1);  getitem_12 = None
    add_11 = 1 + unsqueeze_10;  unsqueeze_10 = None
    mul_8 = blocks_1_norm2 * add_11;  blocks_1_norm2 = add_11 = None
    unsqueeze_11 = getitem_11.unsqueeze(1);  getitem_11 = None
    add_12 = mul_8 + unsqueeze_11;  mul_8 = unsqueeze_11 = None
    flatten_2 = add_12.flatten(0, -2)
    blocks_1_moe_ep_router = getattr(self.blocks, "1").moe.ep_router(flatten_2)
    getitem_35 = blocks_1_moe_ep_router[0]
    getitem_36 = blocks_1_moe_ep_router[1];  blocks_1_moe_ep_router = None
    permute_1 = moedit_runtime_expert_ops_permute(flatten_2, getitem_35, 2, 4);  getitem_35 = None
    getitem_37 = permute_1[0]
    getitem_38 = permute_1[1]
    getitem_39 = permute_1[2];  permute_1 = None
    blocks_1_moe_shared_experts = getattr(self.blocks, "1").moe.shared_experts(flatten_2);  flatten_2 = None
    blocks_1_moe_ep_stale_counts = getattr(self.blocks, "1").moe.ep_stale_counts(getitem_39)
    getattr_12 = in_flight_1.pending
    getattr_13 = in_flight_1.order
    getattr_14 = in_flight_1.send_counts
    getattr_15 = in_flight_1.recv_counts;  in_flight_1 = None
    wait_11 = moedit_runtime_comm_wait(getattr_12);  getattr_12 = None
    blocks_0_moe_ep_experts_1 = getattr(self.blocks, "0").moe.ep_experts(wait_11, getattr_15);  wait_11 = None
    splits_12 = moedit_runtime_expert_ops_splits(getattr_14)
    splits_13 = moedit_runtime_expert_ops_splits(getattr_15)
    blocks_0_moe_ep_stale_combine = getattr(self.blocks, "0").moe.ep_stale_combine(blocks_0_moe_ep_experts_1, splits_13, splits_12);  blocks_0_moe_ep_experts_1 = splits_13 = splits_12 = None
    in_flight_2 = moedit_runtime_cache_in_flight(blocks_0_moe_ep_stale_combine, getattr_13, getattr_14, getattr_15);  blocks_0_moe_ep_stale_combine = getattr_13 = getattr_14 = getattr_15 = None
    blocks_1_moe_ep_write_layer0_combine = getattr(self.blocks, "1").moe.ep_write_layer0_combine(in_flight_2);  in_flight_2 = blocks_1_moe_ep_write_layer0_combine = None
    getattr_16 = in_flight.pending
    getattr_17 = in_flight.order
    getattr_18 = in_flight.send_counts;  getattr_18 = None
    getattr_19 = in_flight.recv_counts;  in_flight = getattr_19 = None
    wait_12 = moedit_runtime_comm_wait(getattr_16);  getattr_16 = None
    blocks_1_moe_ep_slot_cache = getattr(self.blocks, "1").moe.ep_slot_cache(wait_12, getattr_17, getitem_36);  wait_12 = getattr_17 = getitem_36 = None
    wait_13 = moedit_runtime_comm_wait(blocks_1_moe_ep_stale_counts);  blocks_1_moe_ep_stale_counts = None
    splits_14 = moedit_runtime_expert_ops_splits(getitem_39)
    splits_15 = moedit_runtime_expert_ops_splits(wait_13)
    blocks_1_moe_ep_stale_dispatch = getattr(self.blocks, "1").moe.ep_stale_dispatch(getitem_37, splits_14, splits_15);  getitem_37 = splits_14 = splits_15 = None
    in_flight_3 = moedit_runtime_cache_in_flight(blocks_1_moe_ep_stale_dispatch, getitem_38, getitem_39, wait_13);  blocks_1_moe_ep_stale_dispatch = getitem_38 = getitem_39 = wait_13 = None
    blocks_1_moe_ep_write_ring_dispatch = getattr(self.blocks, "1").moe.ep_write_ring_dispatch(in_flight_3);  in_flight_3 = blocks_1_moe_ep_write_ring_dispatch = None
    blocks_1_moe_ep_merge = getattr(self.blocks, "1").moe.ep_merge(blocks_1_moe_ep_slot_cache, blocks_1_moe_shared_experts);  blocks_1_moe_ep_slot_cache = blocks_1_moe_shared_experts = None
    reshape_as_1 = blocks_1_moe_ep_merge.reshape_as(add_12);  blocks_1_moe_ep_merge = add_12 = None
    mul_9 = unsqueeze_9 * reshape_as_1;  unsqueeze_9 = reshape_as_1 = None
    add_13 = add_10 + mul_9;  add_10 = mul_9 = None
    blocks_2_ada_ln_modulation_0 = getattr(getattr(self.blocks, "2").adaLN_modulation, "0")(add_1)
    blocks_2_ada_ln_modulation_1 = getattr(getattr(self.blocks, "2").adaLN_modulation, "1")(blocks_2_ada_ln_modulation_0);  blocks_2_ada_ln_modulation_0 = None
    chunk_2 = blocks_2_ada_ln_modulation_1.chunk(6, dim = 1);  blocks_2_ada_ln_modulation_1 = None
    getitem_14 = chunk_2[0]
    getitem_15 = chunk_2[1]
    getitem_16 = chunk_2[2]
    getitem_17 = chunk_2[3]
    getitem_18 = chunk_2[4]
    getitem_19 = chunk_2[5];  chunk_2 = None
    unsqueeze_12 = getitem_16.unsqueeze(1);  getitem_16 = None
    blocks_2_norm1 = getattr(self.blocks, "2").norm1(add_13)
    unsqueeze_13 = getitem_15.unsqueeze(1);  getitem_15 = None
    add_14 = 1 + unsqueeze_13;  unsqueeze_13 = None
    mul_10 = blocks_2_norm1 * add_14;  blocks_2_norm1 = add_14 = None
    unsqueeze_14 = getitem_14.unsqueeze(1);  getitem_14 = None
    add_15 = mul_10 + unsqueeze_14;  mul_10 = unsqueeze_14 = None
    blocks_2_attn = getattr(self.blocks, "2").attn(add_15);  add_15 = None
    mul_11 = unsqueeze_12 * blocks_2_attn;  unsqueeze_12 = blocks_2_attn = None
    add_16 = add_13 + mul_11;  add_13 = mul_11 = None
    unsqueeze_15 = getitem_19.unsqueeze(1);  getitem_19 = None
    blocks_2_norm2 = getattr(self.blocks, "2").norm2(add_16)
    unsqueeze_16 = getitem_18.unsqueeze(1);  getitem_18 = None
    add_17 = 1 + unsqueeze_16;  unsqueeze_16 = None
    mul_12 = blocks_2_norm2 * add_17;  blocks_2_norm2 = add_17 = None
    unsqueeze_17 = getitem_17.unsqueeze(1);  getitem_17 = None
    add_18 = mul_12 + unsqueeze_17;  mul_12 = unsqueeze_17 = None
    flatten_3 = add_18.flatten(0, -2)
    blocks_2_moe_ep_router = getattr(self.blocks, "2").moe.ep_router(flatten_3)
    getitem_40 = blocks_2_moe_ep_router[0]
    getitem_41 = blocks_2_moe_ep_router[1];  blocks_2_moe_ep_router = None
    permute_2 = moedit_runtime_expert_ops_permute(flatten_3, getitem_40, 2, 4);  getitem_40 = None
    getitem_42 = permute_2[0]
    getitem_43 = permute_2[1]
    getitem_44 = permute_2[2];  permute_2 = None
    blocks_2_moe_ep_counts = getattr(self.blocks, "2").moe.ep_counts(getitem_44)
    splits_4 = moedit_runtime_expert_ops_splits(getitem_44);  getitem_44 = None
    splits_5 = moedit_runtime_expert_ops_splits(blocks_2_moe_ep_counts)
    blocks_2_moe_ep_dispatch = getattr(self.blocks, "2").moe.ep_dispatch(getitem_42, splits_4, splits_5);  getitem_42 = None
    blocks_2_moe_shared_experts = getattr(self.blocks, "2").moe.shared_experts(flatten_3);  flatten_3 = None
    wait_4 = moedit_runtime_comm_wait(blocks_2_moe_ep_dispatch);  blocks_2_moe_ep_dispatch = None
    blocks_2_moe_ep_experts = getattr(self.blocks, "2").moe.ep_experts(wait_4, blocks_2_moe_ep_counts);  wait_4 = blocks_2_moe_ep_counts = None
    blocks_2_moe_ep_combine = getattr(self.blocks, "2").moe.ep_combine(blocks_2_moe_ep_experts, splits_5, splits_4);  blocks_2_moe_ep_experts = splits_5 = splits_4 = None
    wait_5 = moedit_runtime_comm_wait(blocks_2_moe_ep_combine);  blocks_2_moe_ep_combine = None
    blocks_2_moe_ep_slot_cache = getattr(self.blocks, "2").moe.ep_slot_cache(wait_5, getitem_43, getitem_41);  wait_5 = getitem_43 = getitem_41 = None
    blocks_2_moe_ep_merge = getattr(self.blocks, "2").moe.ep_merge(blocks_2_moe_ep_slot_cache, blocks_2_moe_shared_experts);  blocks_2_moe_ep_slot_cache = blocks_2_moe_shared_experts = None
    reshape_as_2 = blocks_2_moe_ep_merge.reshape_as(add_18);  blocks_2_moe_ep_merge = add_18 = None
    mul_13 = unsqueeze_15 * reshape_as_2;  unsqueeze_15 = reshape_as_2 = None
    add_19 = add_16 + mul_13;  add_16 = mul_13 = None
    blocks_3_ada_ln_modulation_0 = getattr(getattr(self.blocks, "3").adaLN_modulation, "0")(add_1)
    blocks_3_ada_ln_modulation_1 = getattr(getattr(self.blocks, "3").adaLN_modulation, "1")(blocks_3_ada_ln_modulation_0);  blocks_3_ada_ln_modulation_0 = None
    chunk_3 = blocks_3_ada_ln_modulation_1.chunk(6, dim = 1);  blocks_3_ada_ln_modulation_1 = None
    getitem_20 = chunk_3[0]
    getitem_21 = chunk_3[1]
    getitem_22 = chunk_3[2]
    getitem_23 = chunk_3[3]
    getitem_24 = chunk_3[4]
    getitem_25 = chunk_3[5];  chunk_3 = None
    unsqueeze_18 = getitem_22.unsqueeze(1);  getitem_22 = None
    blocks_3_norm1 = getattr(self.blocks, "3").norm1(add_19)
    unsqueeze_19 = getitem_21.unsqueeze(1);  getitem_21 = None
    add_20 = 1 + unsqueeze_19;  unsqueeze_19 = None
    mul_14 = blocks_3_norm1 * add_20;  blocks_3_norm1 = add_20 = None
    unsqueeze_20 = getitem_20.unsqueeze(1);  getitem_20 = None
    add_21 = mul_14 + unsqueeze_20;  mul_14 = unsqueeze_20 = None
    blocks_3_attn = getattr(self.blocks, "3").attn(add_21);  add_21 = None
    mul_15 = unsqueeze_18 * blocks_3_attn;  unsqueeze_18 = blocks_3_attn = None
    add_22 = add_19 + mul_15;  add_19 = mul_15 = None
    unsqueeze_21 = getitem_25.unsqueeze(1);  getitem_25 = None
    blocks_3_norm2 = getattr(self.blocks, "3").norm2(add_22)
    unsqueeze_22 = getitem_24.unsqueeze(1);  getitem_24 = None
    add_23 = 1 + unsqueeze_22;  unsqueeze_22 = None
    mul_16 = blocks_3_norm2 * add_23;  blocks_3_norm2 = add_23 = None
    unsqueeze_23 = getitem_23.unsqueeze(1);  getitem_23 = None
    add_24 = mul_16 + unsqueeze_23;  mul_16 = unsqueeze_23 = None
    flatten_4 = add_24.flatten(0, -2)
    blocks_3_moe_ep_router = getattr(self.blocks, "3").moe.ep_router(flatten_4)
    getitem_45 = blocks_3_moe_ep_router[0]
    getitem_46 = blocks_3_moe_ep_router[1];  blocks_3_moe_ep_router = None
    permute_3 = moedit_runtime_expert_ops_permute(flatten_4, getitem_45, 2, 4);  getitem_45 = None
    getitem_47 = permute_3[0]
    getitem_48 = permute_3[1]
    getitem_49 = permute_3[2];  permute_3 = None
    blocks_3_moe_ep_counts = getattr(self.blocks, "3").moe.ep_counts(getitem_49)
    splits_6 = moedit_runtime_expert_ops_splits(getitem_49);  getitem_49 = None
    splits_7 = moedit_runtime_expert_ops_splits(blocks_3_moe_ep_counts)
    blocks_3_moe_ep_dispatch = getattr(self.blocks, "3").moe.ep_dispatch(getitem_47, splits_6, splits_7);  getitem_47 = None
    blocks_3_moe_shared_experts = getattr(self.blocks, "3").moe.shared_experts(flatten_4);  flatten_4 = None
    wait_6 = moedit_runtime_comm_wait(blocks_3_moe_ep_dispatch);  blocks_3_moe_ep_dispatch = None
    blocks_3_moe_ep_experts = getattr(self.blocks, "3").moe.ep_experts(wait_6, blocks_3_moe_ep_counts);  wait_6 = blocks_3_moe_ep_counts = None
    blocks_3_moe_ep_combine = getattr(self.blocks, "3").moe.ep_combine(blocks_3_moe_ep_experts, splits_7, splits_6);  blocks_3_moe_ep_experts = splits_7 = splits_6 = None
    wait_7 = moedit_runtime_comm_wait(blocks_3_moe_ep_combine);  blocks_3_moe_ep_combine = None
    blocks_3_moe_ep_slot_cache = getattr(self.blocks, "3").moe.ep_slot_cache(wait_7, getitem_48, getitem_46);  wait_7 = getitem_48 = getitem_46 = None
    blocks_3_moe_ep_merge = getattr(self.blocks, "3").moe.ep_merge(blocks_3_moe_ep_slot_cache, blocks_3_moe_shared_experts);  blocks_3_moe_ep_slot_cache = blocks_3_moe_shared_experts = None
    reshape_as_3 = blocks_3_moe_ep_merge.reshape_as(add_24);  blocks_3_moe_ep_merge = add_24 = None
    mul_17 = unsqueeze_21 * reshape_as_3;  unsqueeze_21 = reshape_as_3 = None
    add_25 = add_22 + mul_17;  add_22 = mul_17 = None
    final_layer_ada_ln_modulation_0 = getattr(self.final_layer.adaLN_modulation, "0")(add_1);  add_1 = None
    final_layer_ada_ln_modulation_1 = getattr(self.final_layer.adaLN_modulation, "1")(final_layer_ada_ln_modulation_0);  final_layer_ada_ln_modulation_0 = None
    chunk_4 = final_layer_ada_ln_modulation_1.chunk(2, dim = 1);  final_layer_ada_ln_modulation_1 = None
    getitem_26 = chunk_4[0]
    getitem_27 = chunk_4[1];  chunk_4 = None
    final_layer_norm_final = self.final_layer.norm_final(add_25);  add_25 = None
    unsqueeze_24 = getitem_27.unsqueeze(1);  getitem_27 = None
    add_26 = 1 + unsqueeze_24;  unsqueeze_24 = None
    mul_18 = final_layer_norm_final * add_26;  final_layer_norm_final = add_26 = None
    unsqueeze_25 = getitem_26.unsqueeze(1);  getitem_26 = None
    add_27 = mul_18 + unsqueeze_25;  mul_18 = unsqueeze_25 = None
    final_layer_linear = self.final_layer.linear(add_27);  add_27 = None
    getattr_2 = final_layer_linear.shape
    getitem_28 = getattr_2[0];  getattr_2 = None
    reshape = final_layer_linear.reshape(getitem_28, 4, 4, 2, 2, 8);  final_layer_linear = getitem_28 = None
    einsum = torch.functional.einsum('nhwpqc->nchpwq', reshape)
    getattr_3 = reshape.shape;  reshape = None
    getitem_29 = getattr_3[0];  getattr_3 = None
    reshape_1 = einsum.reshape(getitem_29, 8, 8, 8);  einsum = getitem_29 = None
    return reshape_1
    