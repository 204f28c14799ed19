"""Where does trainq's CVAE step lose time against the reference? Replays, in PyTorch itself,
the reference step ("ref": contiguous slices, one_hot per step) and trainq's op sequence
("trainq": shuffled gather into fixed buffers, one-hot gathered from an identity matrix, noise
filled in place, device-side metric accumulators), alternating, and prints images/s of each.
Run: .tools/python bench/cvae_step_variants.py
"""
import os
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, os.environ.get('TRAINQ_REFERENCE_DIR', os.path.dirname(os.path.abspath(__file__)))); import torch_reference as R
torch.manual_seed(0)
bs=128; n=8192
m=R.Cvae(); data=torch.rand(n,3,32,32); y=torch.randint(100,(n,))
eye=torch.eye(100)
opt=torch.optim.Adam(m.parameters(),1e-3)
x=torch.empty(bs,3,32,32); yy=torch.empty(bs,dtype=torch.long); cond=torch.empty(bs,100); eps=torch.empty(bs,20)
rs=torch.zeros((),dtype=torch.float64); ks=torch.zeros((),dtype=torch.float64)
def fwd(x,cond,eps):
    h = F.relu(F.max_pool2d(m.conv1(x), 2)); h = F.relu(F.max_pool2d(m.conv2(h), 2)); h = F.relu(F.max_pool2d(m.conv3(h), 2)).flatten(1)
    mu, logvar = m.fc_mu(h), m.fc_sigma(h)
    z = mu + torch.exp(0.5 * logvar) * eps
    d = F.relu(m.fc_dec(torch.cat([z, cond], 1))).view(-1, 128, 4, 4)
    d = F.relu(m.conv_dec1(d)); d = F.relu(m.conv_dec2(d)); logits = m.conv_dec3(d)
    rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kl = (logvar.exp() + mu.pow(2) - logvar - 1).sum()*0.5
    return rec, kl
def step(i, mode):
    idx=torch.arange((i*bs)%(n-bs),(i*bs)%(n-bs)+bs)
    if mode=='trainq':
        torch.index_select(data,0,idx,out=x); torch.index_select(y,0,idx,out=yy); torch.index_select(eye,0,yy,out=cond); eps.normal_()
        opt.zero_grad()
        rec,kl=fwd(x,cond,eps); loss=(rec+kl*1.0)/bs; loss.backward(); opt.step()
        with torch.no_grad(): rs.add_(rec); ks.add_(kl)
    else:
        loss=m.loss(data[idx[0]:idx[0]+bs], F.one_hot(y[idx[0]:idx[0]+bs],100).float()); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
for mode in ['ref','trainq','ref','trainq']:
    for i in range(10): step(i,mode)
    t=time.perf_counter()
    for i in range(60): step(i,mode)
    print(mode, round(bs*60/(time.perf_counter()-t)))
